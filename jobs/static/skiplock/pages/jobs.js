/*
 * Skiplock job pages: follow jobs live. Plain JavaScript, no build step, no dependency.
 *
 * Every element with [data-skiplock-job] (rendered by {% skiplock_job_status %}) is followed:
 *  - over the REST API's Server-Sent Events (data-events-url): a snapshot, then `progress` and
 *    `state` events ({id, state, display_state, progress, step, attempts}), then `end`;
 *  - if the stream fails, by polling the API's status (data-status-url) every 2 s;
 *  - when the state changes (and when the job ends), the server re-renders the component
 *    (data-fragment-url), so the result and the error look exactly as on a fresh page load.
 * A list ([data-skiplock-job-list] with data-events-url) follows all its jobs over one stream.
 * Without JavaScript the pages still work: the status page reloads itself until the job ends.
 */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var MAX_STREAM_ERRORS = 3;
  var script = document.currentScript;
  var vocabulary = { states: {}, final: [] };
  try {
    vocabulary = JSON.parse((script && script.getAttribute("data-skiplock-states")) || "{}");
  } catch (e) { /* keep the defaults: badges keep their server-rendered text */ }
  var jobs = [];

  function isFinal(state) {
    return (vocabulary.final || []).indexOf(state) !== -1;
  }

  function formatDuration(seconds) {
    // Mirrors jobs.pages.format_duration.
    if (seconds < 10) return seconds.toFixed(1) + " s";
    var whole = Math.floor(seconds);
    if (whole < 60) return whole + " s";
    var minutes = Math.floor(whole / 60), secs = whole % 60;
    if (minutes < 60) return minutes + " min " + (secs < 10 ? "0" : "") + secs + " s";
    var hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    if (hours < 48) return hours + " h " + (minutes < 10 ? "0" : "") + minutes + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  // Times are rendered in the server's zone; show them in the reader's.
  function localiseTimes(root) {
    if (!window.Intl) return;
    var format = new Intl.DateTimeFormat(undefined, {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit"
    });
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (isNaN(moment.getTime())) return;
      el.title = el.getAttribute("datetime");
      el.textContent = format.format(moment);
    });
  }

  function parse(event) {
    try { return JSON.parse(event.data); } catch (e) { return null; }
  }

  function getJSON(url) {
    return fetch(url, {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" }
    }).then(function (response) {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    });
  }

  // --- one followed job ----------------------------------------------------------------------

  function Job(root) {
    this.root = root;
    this.id = root.getAttribute("data-skiplock-job");
    this.managed = false;   // true when a list's shared stream feeds it
    this.es = null;
    this.streamErrors = 0;
    this.timer = null;
    this.polling = false;
    this.refreshing = null;
    this.read();
  }

  Job.prototype.read = function () {
    var d = this.root.dataset;
    this.state = d.state;
    this.displayState = d.displayState;
    this.final = d.final === "1";
    this.maxAttempts = d.maxAttempts || "";
    this.elapsed0 = parseFloat(d.elapsed) || 0;
    this.t0 = performance.now();
    this.ticking = d.ticking === "1";
    localiseTimes(this.root);
  };

  Job.prototype.part = function (name) {
    return this.root.querySelector('[data-sk="' + name + '"]');
  };

  Job.prototype.apply = function (data) {
    if (!data || typeof data !== "object") return;
    if (data.id !== undefined && String(data.id) !== this.id) return;
    this.last = {
      state: data.state || this.state, attempts: data.attempts,
      progress: data.progress, step: data.step
    };
    if (typeof data.progress === "number") this.setProgress(data.progress, data.step);
    else if (typeof data.step === "string") this.setText("step", data.step);
    if (typeof data.attempts === "number") {
      this.setText("attempts", this.maxAttempts ? data.attempts + " of " + this.maxAttempts : String(data.attempts));
    }
    if (data.display_state) this.setBadge(data.display_state);
    if (data.state && data.state !== this.state) {
      this.state = data.state;
      this.root.setAttribute("data-state", data.state);
      if (isFinal(data.state)) this.finish();
      else this.refresh();
    }
  };

  Job.prototype.setText = function (name, text) {
    var el = this.part(name);
    if (el && el.textContent !== text) el.textContent = text;
  };

  Job.prototype.setProgress = function (percent, step) {
    percent = Math.max(0, Math.min(100, Math.round(percent)));
    var bar = this.part("bar"), fill = this.part("fill");
    if (typeof step === "string") this.setText("step", step);
    var stepText = typeof step === "string" ? step : (this.part("step") || {}).textContent || "";
    if (bar) {
      bar.setAttribute("aria-valuenow", String(percent));
      bar.setAttribute("aria-valuetext", percent + "%" + (stepText ? ": " + stepText : ""));
    }
    if (fill) fill.style.width = percent + "%";
    this.setText("percent", percent + "%");
    this.retitle();
  };

  Job.prototype.setBadge = function (displayState) {
    var badge = this.part("badge"), info = (vocabulary.states || {})[displayState];
    if (!badge || !info || badge.getAttribute("data-state") === displayState) return;
    badge.setAttribute("data-state", displayState);
    badge.className = "sk-badge sk-badge--" + info.colour;
    badge.textContent = info.label;
    this.displayState = displayState;
    this.root.setAttribute("data-display-state", displayState);
    var fill = this.part("fill");
    if (fill) fill.className = "sk-progress__fill sk-fill--" + info.colour;
    this.retitle();
  };

  // On a job's own page, the tab title follows it too (useful in a background tab).
  Job.prototype.retitle = function () {
    var body = document.body;
    if (!body || body.getAttribute("data-sk-title-job") !== this.id) return;
    var badge = this.part("badge"), bar = this.part("bar");
    var label = badge ? badge.textContent : "", percent = bar ? bar.getAttribute("aria-valuenow") : "";
    var title = body.getAttribute("data-sk-title") + " — " + label + " · Skiplock";
    document.title = (this.final || isFinal(this.state) ? "" : percent + "% · ") + title;
  };

  Job.prototype.tick = function () {
    if (!this.ticking) return;
    this.setText("elapsed", formatDuration(this.elapsed0 + (performance.now() - this.t0) / 1000));
  };

  // Swap in the server's rendering of the component: results, errors, buttons, timestamps.
  // Asked again while a request is out (the state moved on meanwhile), it fetches once more after.
  Job.prototype.refresh = function () {
    var self = this, url = this.root.dataset.fragmentUrl;
    if (!url) return Promise.resolve();
    if (this.refreshing) {
      this.refreshAgain = true;
      return this.refreshing;
    }
    this.refreshing = fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) { self.swap(html); })
      .catch(function () { /* the next event or poll tries again */ })
      .then(function () {
        self.refreshing = null;
        if (self.refreshAgain) {
          self.refreshAgain = false;
          return self.refresh();
        }
      });
    return this.refreshing;
  };

  Job.prototype.swap = function (html) {
    var holder = document.createElement("template");
    holder.innerHTML = html.trim();
    var fresh = holder.content.querySelector("[data-skiplock-job]");
    if (!fresh) return;
    var root = this.root, hadFocus = root.contains(document.activeElement);
    Array.prototype.slice.call(fresh.attributes).forEach(function (attr) {
      root.setAttribute(attr.name, attr.value);
    });
    root.innerHTML = fresh.innerHTML;
    this.read();
    this.retitle();
    // A rendering started before the latest progress event must not move the bar back.
    var last = this.last, shown = parseInt(root.dataset.progress, 10);
    if (!this.final && last && typeof last.progress === "number" && last.progress > shown &&
        last.state === this.state && String(last.attempts) === root.dataset.attempts) {
      this.setProgress(last.progress, last.step);
    }
    if (hadFocus) {
      var title = root.querySelector(".sk-job__title");
      if (title) { title.setAttribute("tabindex", "-1"); title.focus(); }
    }
    if (this.final) this.stop();
    else if (!this.managed && !this.es && !this.polling) this.follow();
  };

  Job.prototype.finish = function () {
    this.final = true;
    this.ticking = false;
    this.stop();
    var self = this;
    return this.refresh().then(function () {
      // The page must agree that the job ended; if it does not yet, ask again every 2 s.
      if (!self.final) { self.managed = false; self.poll(); }
    });
  };

  Job.prototype.stop = function () {
    if (this.es) { this.es.close(); this.es = null; }
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    this.polling = false;
  };

  Job.prototype.follow = function () {
    if (this.final) return;
    var url = this.root.dataset.eventsUrl;
    if (!window.EventSource || !url) { this.poll(); return; }
    var self = this, es = new EventSource(url);
    this.es = es;
    var onEvent = function (event) {
      self.streamErrors = 0;
      self.apply(parse(event));
    };
    ["snapshot", "progress", "state", "message"].forEach(function (type) {
      es.addEventListener(type, onEvent);
    });
    es.addEventListener("end", function (event) {
      if (self.es === es) { es.close(); self.es = null; }
      onEvent(event);
      if (!self.final) self.finish();
    });
    es.onopen = function () {
      // The stream is back: stop polling beside it.
      if (self.timer) { clearTimeout(self.timer); self.timer = null; }
      self.polling = false;
    };
    es.onerror = function () {
      if (self.es !== es || self.final) return;
      self.streamErrors += 1;
      if (es.readyState === EventSource.CLOSED || self.streamErrors >= MAX_STREAM_ERRORS) {
        es.close();
        self.es = null;
      }
      self.poll();  // meanwhile (and from now on, if the stream is gone), ask every 2 s
    };
  };

  Job.prototype.poll = function () {
    if (this.polling || this.final) return;
    this.polling = true;
    var self = this, url = this.root.dataset.statusUrl;
    var round = function () {
      if (!self.polling || self.final) return;
      var ask = url ? getJSON(url).then(function (data) { self.apply(data); }) : Promise.reject(new Error("no API"));
      ask.catch(function () { return self.refresh(); })  // no API: the server-rendered component still works
        .then(function () {
          if (self.polling && !self.final) self.timer = setTimeout(round, POLL_MS);
        });
    };
    round();
  };

  // --- a list of jobs over one shared stream ---------------------------------------------------

  function followList(list, members) {
    var url = list.dataset.eventsUrl;
    var open = members.filter(function (job) { return !job.final; });
    if (!open.length) return;
    if (!window.EventSource || !url) {
      open.forEach(function (job) { job.poll(); });
      return;
    }
    var byId = {};
    open.forEach(function (job) { job.managed = true; byId[job.id] = job; });
    var es = new EventSource(url), errors = 0;
    var route = function (event) {
      errors = 0;
      var data = parse(event);
      if (data && byId[String(data.id)]) byId[String(data.id)].apply(data);
      return data;
    };
    ["snapshot", "progress", "state", "message"].forEach(function (type) { es.addEventListener(type, route); });
    es.addEventListener("end", function (event) {
      var data = route(event);
      if (data && byId[String(data.id)]) {
        if (!byId[String(data.id)].final) byId[String(data.id)].finish();
        delete byId[String(data.id)];
      }
      if (!data || data.id === undefined || !Object.keys(byId).length) es.close();
    });
    es.onerror = function () {
      errors += 1;
      if (es.readyState === EventSource.CLOSED || errors >= MAX_STREAM_ERRORS) {
        es.close();
        Object.keys(byId).forEach(function (id) {
          var job = byId[id];
          job.managed = false;
          if (!job.final) job.poll();
        });
      }
    };
  }

  // --- cancel / abort through the API, falling back to the plain form ----------------------------

  function onSubmit(event) {
    var form = event.target;
    if (!form || !form.matches) return;
    if (form.matches("form[data-sk-action]")) return act(event, form);
    if (form.matches("form[data-sk-form]")) {
      // Starting a job: one click, one job.
      var button = form.querySelector("button[type=submit]");
      if (button) {
        if (button.disabled) { event.preventDefault(); return; }
        button.disabled = true;
        button.textContent = "Starting…";
      }
    }
  }

  function act(event, form) {
    var url = form.getAttribute("data-api-url"), root = form.closest("[data-skiplock-job]");
    var token = form.querySelector("input[name=csrfmiddlewaretoken]");
    if (!url || !root || !token || !window.fetch) return;
    event.preventDefault();
    var button = form.querySelector("button");
    if (button) button.disabled = true;
    var job = jobs.filter(function (j) { return j.root === root; })[0];
    fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "X-CSRFToken": token.value, Accept: "application/json" }
    }).then(function (response) {
      if (response.ok || response.status === 409) {
        // 409: the job moved on meanwhile; either way, show where it is now.
        if (job) job.refresh();
        return;
      }
      form.submit();  // the API refused in a way the page's own form handles (or is absent)
    }).catch(function () { form.submit(); });
  }

  // --- start ------------------------------------------------------------------------------------

  function start() {
    var roots = document.querySelectorAll("[data-skiplock-job]");
    jobs = Array.prototype.map.call(roots, function (root) { return new Job(root); });
    var listed = [];
    document.querySelectorAll("[data-skiplock-job-list]").forEach(function (list) {
      var members = jobs.filter(function (job) { return list.contains(job.root); });
      listed = listed.concat(members);
      followList(list, members);
    });
    jobs.forEach(function (job) {
      if (listed.indexOf(job) === -1) job.follow();
    });
    setInterval(function () { jobs.forEach(function (job) { job.tick(); }); }, 1000);
    document.addEventListener("submit", onSubmit);
    var errors = document.querySelector('[data-sk="form-errors"]');
    if (errors) errors.focus();
    window.addEventListener("pageshow", function (event) {
      if (event.persisted) window.location.reload();  // back from the cache: show the current state
    });
  }

  window.Skiplock = { follow: function (root) { var job = new Job(root); jobs.push(job); job.follow(); return job; } };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
