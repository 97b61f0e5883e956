"""API keys in the admin: created through apikey_create (the raw key is shown once), revoked by apikey_revoke."""

from __future__ import annotations

from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from jobs.apikeys import apikey_create, apikey_revoke
from jobs.models import ApiKey


class ApiKeyCreateForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices, widget=forms.CheckboxSelectMultiple, initial=[ApiKey.Scope.READ],
        help_text="start: start jobs · read: read jobs and their events · manage: cancel, abort, retry",
    )
    expires_at = forms.DateTimeField(required=False, help_text="Leave empty for a key that does not expire.",
                                     widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "expires_at")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        expires = data.get("expires_at")
        if expires is not None and expires <= timezone.now():
            self.add_error("expires_at", "must be in the future")
        return data


class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix_column", "scopes_column", "status", "created_at", "expires_at",
                    "last_used_at", "created_by")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    ordering = ("-created_at",)
    actions = ["revoke_keys"]
    form = ApiKeyCreateForm
    readonly_fields = ("name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at",
                       "created_by")
    change_form_template = "admin/jobs/apikey/change_form.html"

    class Media:
        css = {"all": ("skiplock/admin/console.css",)}

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return () if obj is None else self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return ("name", "scopes", "expires_at") if obj is None else self.readonly_fields

    @admin.display(description="key")
    def prefix_column(self, obj: ApiKey) -> str:
        return format_html("<code>sk_{}_…</code>", obj.prefix)

    @admin.display(description="scopes")
    def scopes_column(self, obj: ApiKey) -> str:
        return ", ".join(obj.scopes)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        if obj.revoked_at:
            return format_html('<span class="sl-badge sl-grey">revoked</span>')
        if obj.expires_at and obj.expires_at <= timezone.now():
            return format_html('<span class="sl-badge sl-orange">expired</span>')
        return format_html('<span class="sl-badge sl-green">active</span>')

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            raise PermissionDenied("API keys cannot be edited; revoke and create a new one")
        key, raw = apikey_create(name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"],
                                 expires_at=form.cleaned_data.get("expires_at"), created_by_id=request.user.pk)
        obj.pk = key.pk
        obj.prefix = key.prefix
        request._skiplock_raw_key = raw  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        raw = getattr(request, "_skiplock_raw_key", None)
        key = ApiKey.objects.get(pk=obj.pk)
        context = {**self.admin_site.each_context(request), "title": "API key created", "opts": self.opts,
                   "key": key, "raw_key": raw, "changelist_url": reverse("admin:jobs_apikey_changelist")}
        response = TemplateResponse(request, "admin/jobs/apikey/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: a revoked key stays listed for the record

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = [key for key in queryset if apikey_revoke(key_id=key.pk)]
        if revoked:
            LogEntry.objects.log_actions(cast(int, request.user.pk), revoked, CHANGE,
                                         change_message=[{"changed": {"fields": ["revoked"]}}])
            self.message_user(request, f"Revoked {len(revoked)} key(s).", messages.SUCCESS)
        skipped = queryset.count() - len(revoked)
        if skipped:
            self.message_user(request, f"{skipped} key(s) were already revoked.", messages.WARNING)

    def get_urls(self) -> list[URLPattern]:
        revoke = path("<int:key_id>/revoke/", self.admin_site.admin_view(self.revoke_view), name="jobs_apikey_revoke")
        return [revoke, *super().get_urls()]

    def revoke_view(self, request: HttpRequest, key_id: int) -> HttpResponse:
        if request.method != "POST" or not self.has_change_permission(request):
            raise PermissionDenied
        key = ApiKey.objects.filter(pk=key_id).first()
        if key is not None and apikey_revoke(key_id=key_id):
            self.log_change(request, key, [{"changed": {"fields": ["revoked"]}}])
            self.message_user(request, f"Revoked {key}.", messages.SUCCESS)
        else:
            self.message_user(request, "That key was already revoked.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:jobs_apikey_change", args=[key_id]))

