"""Start a job from the console: pick a task, give JSON arguments, optional placement; job_defer does the rest."""

from __future__ import annotations

import json
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import ADDITION, LogEntry
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from jobs import services
from jobs.exceptions import SkiplockError
from jobs.models import JobRecord
from jobs.registry import find_task, startable_tasks


def example_args(task_name: str) -> dict[str, Any]:
    """The task's arguments with their defaults (required ones left as null to fill in)."""
    spec = find_task(task_name)
    if spec is None:
        return {}
    return {name: (None if info.is_required() else info.get_default(call_default_factory=True))
            for name, info in spec.args_model.model_fields.items()}


class StartJobForm(forms.Form):
    task = forms.ChoiceField()
    args = forms.CharField(widget=forms.Textarea(attrs={"rows": 10, "class": "vLargeTextField sl-mono",
                                                        "spellcheck": "false"}),
                           initial="{}", help_text="JSON object of keyword arguments.")
    queue = forms.CharField(required=False, max_length=128, help_text="Empty: the task's queue.")
    priority = forms.IntegerField(required=False, help_text="Empty: the task's priority (higher runs first).")
    delay_seconds = forms.FloatField(required=False, min_value=0, help_text="Run in this many seconds.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = cast(forms.ChoiceField, self.fields["task"])
        field.choices = [(spec.name, f"{spec.name} ({spec.queue})") for spec in startable_tasks()]

    def clean_args(self) -> dict[str, Any]:
        try:
            value = json.loads(self.cleaned_data["args"] or "{}")
        except ValueError as exc:
            raise forms.ValidationError(f"not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("must be a JSON object, e.g. {\"title\": \"Report\"}")
        return value


def start_view(model_admin: admin.ModelAdmin, request: HttpRequest) -> HttpResponse:
    if not model_admin.has_change_permission(request):
        raise PermissionDenied
    task = request.GET.get("task") or (startable_tasks()[0].name if startable_tasks() else "")
    form = StartJobForm(request.POST or None, initial={
        "task": task, "args": json.dumps(example_args(task), indent=2, default=str)})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = services.job_defer(task_name=data["task"], args=data["args"], queue=data["queue"] or None,
                                     priority=data["priority"], delay_seconds=data["delay_seconds"],
                                     owner_id=cast(int, request.user.pk))
        except SkiplockError as exc:
            for detail in exc.details if isinstance(exc.details, list) else []:
                field = str(detail.get("field", ""))
                target = field if field in form.fields else "args"
                form.add_error(target, f"{field}: {detail.get('message')}" if target == "args" else detail.get("message"))
            if not form.errors:
                form.add_error(None, exc.message)
        else:
            record = JobRecord.objects.get(pk=job.job_id)
            LogEntry.objects.log_actions(cast(int, request.user.pk), [record], ADDITION,
                                         change_message=[{"added": {}}])
            messages.success(request, f"Started job #{job.job_id} ({job.task_name} on {job.queue}).")
            return HttpResponseRedirect(reverse("admin:jobs_jobrecord_change", args=[job.job_id]))
    from jobs.console.pages import nav

    specs = {spec.name: {"description": spec.description, "signature": spec.signature(),
                         "example": example_args(spec.name)} for spec in startable_tasks()}
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Start a job",
        "opts": model_admin.opts,
        "form": form,
        "specs": json.loads(json.dumps(specs, default=str)),
        "console_nav": nav(request),
    }
    return TemplateResponse(request, "admin/jobs/jobrecord/start.html", context)
