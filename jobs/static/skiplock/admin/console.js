// Skiplock job console: live progress on the job page (SSE, then polling), keyboard shortcuts, copy buttons.
(function () {
  "use strict";

  function liveJob(root) {
    var bar = document.querySelector("#sl-progress-bar .sl-progress");
    var fill = bar && bar.firstElementChild;
    var text = document.getElementById("sl-progress-text");
    var step = document.getElementById("sl-step");
    var mode = document.getElementById("sl-live-mode");
    var state = root.dataset.state || "";
    var finished = false;
    var pollTimer = null;
    var pollUrl = root.dataset.apiUrl;

    function apply(data) {
      if (!data || typeof data !== "object") return;
      if (data.job && typeof data.job === "object") data = data.job;
      var p = data.progress;
      if (typeof p === "number" && fill) {
        fill.style.width = p + "%";
        bar.setAttribute("aria-valuenow", String(p));
        text.textContent = p + "%";
      }
      if (typeof data.step === "string") step.textContent = data.step;
      var newState = data.state || data.status;
      if (newState && newState !== state) {
        state = newState;
        bar.className = "sl-progress sl-progress-" + newState;
      }
      if (["succeeded", "failed", "cancelled", "aborted"].indexOf(newState) >= 0 && !finished) {
        finished = true;
        if (pollTimer) clearInterval(pollTimer);
        mode.textContent = "finished — reloading";
        setTimeout(function () { window.location.reload(); }, 400);
      }
    }

    function poll() {
      mode.textContent = "live (polling every 2 s)";
      function once() {
        fetch(pollUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
          .then(function (r) {
            if (!r.ok) throw new Error(String(r.status));
            return r.json();
          })
          .then(apply)
          .catch(function () {
            // The API may want a key: fall back to the console's own status endpoint (staff session).
            if (pollUrl !== root.dataset.statusUrl) { pollUrl = root.dataset.statusUrl; once(); }
          });
      }
      once();
      pollTimer = setInterval(once, 2000);
    }

    if (root.dataset.final === "1") return;
    if (!window.EventSource) { poll(); return; }
    var opened = false;
    var source = new EventSource(root.dataset.eventsUrl, { withCredentials: true });
    var onEvent = function (e) { try { apply(JSON.parse(e.data)); } catch (err) { /* keep-alive or non-JSON */ } };
    ["message", "progress", "state", "end", "job", "snapshot", "update"].forEach(function (name) {
      source.addEventListener(name, onEvent);
    });
    source.onopen = function () { opened = true; mode.textContent = "live"; };
    source.onerror = function () {
      if (finished) { source.close(); return; }
      if (!opened || source.readyState === EventSource.CLOSED) { source.close(); if (!pollTimer) poll(); }
    };
    // A stream that opens but never speaks (e.g. a proxy buffering it) still gets polled.
    setTimeout(function () { if (!opened && !pollTimer) { source.close(); poll(); } }, 3000);
  }

  // The job list: rows of waiting and running jobs follow their job (bar, %, step, badge) every 2 s.
  function liveRows(table) {
    var url = table.dataset.statusUrl;
    function active() {
      return Array.prototype.filter.call(document.querySelectorAll(".sl-row-live"), function (el) {
        return ["todo", "doing", "aborting"].indexOf(el.dataset.state) >= 0;
      });
    }
    function tick() {
      var rows = active();
      if (!rows.length || document.hidden) return;
      var ids = rows.map(function (el) { return el.dataset.job; }).join(",");
      fetch(url + "?ids=" + ids, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : { jobs: [] }; })
        .then(function (data) {
          data.jobs.forEach(function (job) {
            var cell = document.querySelector('.sl-row-live[data-job="' + job.id + '"]');
            if (!cell) return;
            cell.dataset.state = job.state;
            var bar = cell.querySelector(".sl-progress");
            bar.className = "sl-progress sl-progress-" + job.state;
            bar.setAttribute("aria-valuenow", String(job.progress));
            bar.firstElementChild.style.width = job.progress + "%";
            cell.querySelector("small").textContent = job.progress + "%";
            var tr = cell.closest("tr");
            var badge = tr && tr.querySelector(".sl-badge");
            if (badge && badge.dataset.state !== job.display_state) {
              badge.dataset.state = job.display_state;
              badge.className = "sl-badge sl-" + job.colour;
              badge.textContent = job.label;
            }
            var step = tr && tr.querySelector(".field-step_column");
            if (step && job.step) step.textContent = job.step.slice(0, 40);
          });
        })
        .catch(function () { /* try again on the next tick */ });
    }
    if (active().length) setInterval(tick, 2000);
  }

  function shortcuts() {
    var pending = false;
    document.addEventListener("keydown", function (e) {
      var t = e.target;
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) {
        if (e.key === "Escape") t.blur();
        return;
      }
      if (e.key === "/") {
        var box = document.getElementById("searchbar");
        if (box) { e.preventDefault(); box.focus(); box.select(); }
        return;
      }
      if (e.key === "g") { pending = true; setTimeout(function () { pending = false; }, 1200); return; }
      if (pending) {
        pending = false;
        var link = document.querySelector('.sl-nav a[data-key="' + e.key + '"]');
        if (link) { e.preventDefault(); window.location.href = link.href; }
      }
    });
  }

  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var target = document.querySelector(button.dataset.copy);
        if (target && navigator.clipboard) {
          navigator.clipboard.writeText(target.textContent.trim()).then(function () { button.textContent = "Copied"; });
        }
      });
    });
  }

  function startForm(form) {
    var specs = JSON.parse(document.getElementById("sl-task-specs").textContent);
    var task = form.querySelector("#id_task");
    var args = form.querySelector("#id_args");
    var help = document.getElementById("sl-task-help");
    var touched = false;
    args.addEventListener("input", function () { touched = true; });
    function show(fill) {
      var spec = specs[task.value];
      if (!spec) return;
      help.textContent = (spec.description || "").split("\n")[0] + " Arguments: " + spec.signature;
      if (fill && !touched) args.value = JSON.stringify(spec.example, null, 2);
    }
    task.addEventListener("change", function () { show(true); });
    show(false);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var start = document.getElementById("sl-start-form");
    if (start) startForm(start);
    var job = document.getElementById("sl-job");
    if (job) liveJob(job);
    var list = document.getElementById("result_list");
    var live = document.getElementById("sl-list-live");
    if (list && live) liveRows(live);
    shortcuts();
    copyButtons();
  });
})();
