// Run pages, the run list, datasets and the submit wizard: live progress, keyboard shortcuts and small helpers.
// Progress arrives over a websocket when one can be opened; otherwise the status fragment polls itself through
// htmx about once a second (its hx-trigger is filtered on window.flowStudioRunLive).
(function () {
  "use strict";

  var ACTIVE = { Queued: true, Preparing: true, Running: true, Canceling: true };

  function typing(target) {
    if (!target) return false;
    var tag = target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || target.isContentEditable;
  }

  function setText(root, selector, value) {
    var node = root.querySelector(selector);
    if (node) node.textContent = value;
  }

  // ---- live progress over the websocket -------------------------------------------------------------

  function statusBox() {
    return document.getElementById("run-status");
  }

  function refreshStatus() {
    var box = statusBox();
    if (box && window.htmx) {
      window.htmx.ajax("GET", box.getAttribute("data-status-url"), { target: "#run-status", swap: "outerHTML" });
    }
  }

  function applyProgress(progress) {
    var box = statusBox();
    if (!box || !progress) return;
    var total = progress.total || 0;
    var done = progress.done || 0;
    var failed = progress.failed || 0;
    var denominator = total || 1;
    setText(box, "[data-progress-done]", String(done));
    setText(box, "[data-progress-total]", String(total));
    setText(box, "[data-progress-failed]", String(failed));
    var percent = Math.round(progress.percent || 0);
    setText(box, "[data-progress-percent]", percent + "%");
    var bar = box.querySelector("[data-progress-bar]");
    if (bar) bar.setAttribute("aria-valuenow", String(percent));
    var ok = box.querySelector("[data-progress-ok]");
    if (ok) ok.style.width = (100 * (done - failed)) / denominator + "%";
    var bad = box.querySelector("[data-progress-failed-bar]");
    if (bad) bad.style.width = (100 * failed) / denominator + "%";
    var wrap = box.querySelector("[data-progress-failed-wrap]");
    if (wrap) wrap.classList.toggle("has-failed", failed > 0);
    if (progress.tokens && progress.tokens.total_tokens !== undefined) {
      setText(box, "[data-progress-tokens]", String(progress.tokens.total_tokens));
    }
    // A new status changes the actions, timings and error shown: fetch the server's rendering of them.
    if (progress.status && progress.status !== box.getAttribute("data-status")) {
      box.setAttribute("data-status", progress.status);
      var pill = box.querySelector("[data-progress-status]");
      if (pill) {
        pill.textContent = progress.status;
        pill.setAttribute("data-status", progress.status);
      }
      refreshStatus();
    }
  }

  function connectProgress(page) {
    if (!("WebSocket" in window)) return;
    var path = page.getAttribute("data-ws-path");
    var retries = 0;
    var socket = null;

    function open() {
      var box = statusBox();
      if (!box || !box.hasAttribute("data-active")) return; // a finished run has nothing to push
      var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + window.location.host + path);
      socket.onopen = function () {
        retries = 0;
        window.flowStudioRunLive = true;
      };
      socket.onmessage = function (message) {
        var data;
        try {
          data = JSON.parse(message.data);
        } catch (e) {
          return;
        }
        if (data.type === "progress") applyProgress(data.progress);
      };
      socket.onclose = function (event) {
        window.flowStudioRunLive = false;
        // 4401/4404: not allowed. Otherwise reconnect with backoff while the run is still active.
        if (event.code === 4401 || event.code === 4404) return;
        var box = statusBox();
        if (box && box.hasAttribute("data-active") && retries < 30) {
          retries += 1;
          window.setTimeout(open, Math.min(1000 * retries, 10000));
        }
      };
    }

    open();
    window.addEventListener("pagehide", function () {
      if (socket) socket.close();
    });
  }

  function tickDuration() {
    var node = document.querySelector("[data-progress-duration][data-started]");
    if (!node) return;
    var started = Date.parse(node.getAttribute("data-started"));
    if (!isNaN(started)) node.textContent = ((Date.now() - started) / 1000).toFixed(1) + " s";
  }

  // ---- keyboard --------------------------------------------------------------------------------------

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.altKey || event.metaKey) return;
    if ((event.ctrlKey && event.key === "Enter") || (event.metaKey && event.key === "Enter")) {
      var wizard = document.querySelector("[data-wizard]");
      if (wizard && wizard.contains(event.target)) {
        event.preventDefault();
        wizard.requestSubmit();
      }
      return;
    }
    if (event.ctrlKey || typing(event.target)) return;
    if (event.key === "/") {
      var search = document.querySelector("[data-search-box]");
      if (search) {
        event.preventDefault();
        search.focus();
        search.select();
      }
      return;
    }
    var shortcut = document.querySelector('[data-shortcut="' + event.key + '"]');
    if (shortcut) {
      event.preventDefault();
      shortcut.click();
      return;
    }
    var tab = document.querySelector('[data-tabs] [data-key="' + event.key + '"]');
    if (tab) {
      event.preventDefault();
      tab.click();
    }
  });

  // Arrow keys move between tabs, as in any tab list.
  document.addEventListener("keydown", function (event) {
    var current = event.target.closest && event.target.closest('[data-tabs] [role="tab"]');
    if (!current || (event.key !== "ArrowRight" && event.key !== "ArrowLeft")) return;
    var tabs = Array.prototype.slice.call(current.parentNode.querySelectorAll('[role="tab"]'));
    var index = tabs.indexOf(current) + (event.key === "ArrowRight" ? 1 : -1);
    var next = tabs[(index + tabs.length) % tabs.length];
    event.preventDefault();
    next.focus();
  });

  // ---- outputs: selection and traces -------------------------------------------------------------------

  function updateRerun(form) {
    var button = form.querySelector("[data-rerun]");
    if (!button) return;
    var count = form.querySelectorAll('input[name="lines"]:checked').length;
    button.disabled = count === 0;
    button.textContent = count ? "Rerun " + count + " selected line" + (count === 1 ? "" : "s") : "Rerun selected lines";
  }

  document.addEventListener("change", function (event) {
    var form = event.target.closest && event.target.closest("[data-line-selection]");
    if (!form) return;
    if (event.target.hasAttribute("data-select-all")) {
      form.querySelectorAll('input[name="lines"]').forEach(function (box) {
        box.checked = event.target.checked;
      });
    }
    updateRerun(form);
  });

  document.addEventListener("click", function (event) {
    var toggle = event.target.closest("[data-trace-toggle]");
    if (toggle) {
      var row = toggle.closest("tr").nextElementSibling;
      var open = row.hidden;
      row.hidden = !open;
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
      // Loaded once by htmx; a second click only hides it.
      if (!open || row.querySelector(".line-trace").childElementCount) event.stopImmediatePropagation();
      return;
    }
    var remove = event.target.closest("[data-remove-evaluation]");
    if (remove) {
      var fieldset = remove.closest("[data-evaluation]");
      var form = fieldset.closest("form");
      fieldset.remove();
      var hidden = form.querySelector('input[name="evaluations"]');
      if (hidden) {
        hidden.value = Array.prototype.map
          .call(form.querySelectorAll("[data-evaluation]"), function (node) {
            return node.getAttribute("data-evaluation");
          })
          .join(",");
      }
      return;
    }
    var opener = event.target.closest("[data-open-details]");
    if (opener) {
      var details = document.getElementById(opener.getAttribute("data-open-details"));
      if (details) {
        details.open = true;
        var first = details.querySelector("input, select, textarea");
        if (first) window.setTimeout(function () { first.focus(); }, 0);
      }
    }
  }, true);

  // ---- logs: follow the tail -----------------------------------------------------------------------

  function followLogs() {
    var view = document.querySelector("[data-log-view]");
    var follow = document.querySelector("[data-follow-logs]");
    if (view && follow && follow.checked) view.scrollTop = view.scrollHeight;
  }

  // ---- the submit wizard ---------------------------------------------------------------------------

  function Wizard(form) {
    this.form = form;
    this.stepper = document.querySelector("[data-stepper]");
    this.steps = [];
    var seen = {};
    form.querySelectorAll("[data-step]").forEach(function (node) {
      var step = node.getAttribute("data-step");
      if (!seen[step]) {
        seen[step] = true;
        this.steps.push(step);
      }
    }, this);
    this.steps.sort();
    this.current = this.steps[0];
    form.classList.add("wizard-js");
    this.back = form.querySelector("[data-wizard-back]");
    this.next = form.querySelector("[data-wizard-next]");
    this.review = form.querySelector("[data-wizard-review]");
    this.submit = form.querySelector("[data-wizard-submit]");
    var self = this;
    this.back.addEventListener("click", function () { self.move(-1); });
    this.next.addEventListener("click", function () { self.move(1); });
    this.review.addEventListener("click", function () { self.show(self.steps[self.steps.length - 1]); });
    if (this.stepper) {
      this.stepper.addEventListener("click", function (event) {
        var link = event.target.closest("[data-goto]");
        if (!link) return;
        event.preventDefault();
        self.show(link.getAttribute("data-goto"));
      });
    }
    // After a refused submit, open the first step with an error.
    var error = form.querySelector(".errorlist, .has-error");
    var errorStep = error && error.closest("[data-step]");
    this.show(errorStep ? errorStep.getAttribute("data-step") : this.current, !!errorStep);
  }

  Wizard.prototype.move = function (delta) {
    var index = this.steps.indexOf(this.current) + delta;
    if (index >= 0 && index < this.steps.length) this.show(this.steps[index], true);
  };

  Wizard.prototype.show = function (step, focus) {
    this.current = step;
    this.form.querySelectorAll("[data-step]").forEach(function (node) {
      node.classList.toggle("current", node.getAttribute("data-step") === step);
    });
    var index = this.steps.indexOf(step);
    var last = index === this.steps.length - 1;
    this.back.hidden = index === 0;
    this.next.hidden = last;
    this.review.hidden = last || index === 0;
    this.submit.hidden = !last;
    if (this.stepper) {
      this.stepper.querySelectorAll("[data-goto]").forEach(function (link) {
        if (link.getAttribute("data-goto") === step) link.setAttribute("aria-current", "step");
        else link.removeAttribute("aria-current");
      });
    }
    this.markErrors();
    if (last) this.fillReview();
    if (focus) {
      var first = this.form.querySelector('[data-step="' + step + '"].current :is(select, input:not([type=hidden]), textarea)');
      if (first) first.focus();
    }
  };

  Wizard.prototype.markErrors = function () {
    if (!this.stepper) return;
    var form = this.form;
    this.stepper.querySelectorAll("[data-goto]").forEach(function (link) {
      var step = link.getAttribute("data-goto");
      var bad = form.querySelector('[data-step="' + step + '"] .errorlist, [data-step="' + step + '"] .has-error');
      link.classList.toggle("has-error", !!bad);
    });
  };

  Wizard.prototype.fillReview = function () {
    var list = this.form.querySelector("[data-review]");
    if (!list) return;
    var rows = [];
    function selected(name) {
      var select = document.querySelector('#run-wizard select[name="' + name + '"]');
      return select && select.value ? select.options[select.selectedIndex].text : "";
    }
    rows.push(["Flow", selected("flow") || "— not chosen —"]);
    if (selected("version")) rows.push(["Version", selected("version")]);
    var variants = Array.prototype.map.call(this.form.querySelectorAll('input[name="variants"]:checked'), function (box) {
      return box.value;
    });
    rows.push(["Runs", variants.length ? variants.length + " (" + variants.join(", ") + ")" : "1 (default variants)"]);
    rows.push(["Dataset", selected("dataset") || "— not chosen —"]);
    this.form.querySelectorAll('.flow-steps input[name^="map__"]').forEach(function (input) {
      rows.push(["  " + input.name.slice(5), input.value || "(default)"]);
    });
    this.form.querySelectorAll('.flow-steps select[name^="conn__"]').forEach(function (select) {
      if (select.value) rows.push(["Connection " + select.name.slice(6), select.value]);
    });
    ["name", "tags", "concurrency", "line_timeout"].forEach(function (name) {
      var input = document.querySelector('#run-wizard [name="' + name + '"]');
      if (input && input.value) rows.push([name.replace("_", " "), input.value]);
    });
    this.form.querySelectorAll("[data-evaluation]").forEach(function (fieldset) {
      var select = fieldset.querySelector('select[name$="-flow"]');
      if (select && select.value) rows.push(["Evaluation", select.options[select.selectedIndex].text]);
    });
    list.textContent = "";
    rows.forEach(function (row) {
      var dt = document.createElement("dt");
      dt.textContent = row[0];
      var dd = document.createElement("dd");
      dd.textContent = row[1];
      list.appendChild(dt);
      list.appendChild(dd);
    });
  };

  // ---- dataset: a preview in the browser before uploading ----------------------------------------------

  function parseCsv(text) {
    var rows = [];
    var row = [];
    var field = "";
    var quoted = false;
    for (var i = 0; i < text.length; i++) {
      var c = text[i];
      if (quoted) {
        if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
        else if (c === '"') quoted = false;
        else field += c;
      } else if (c === '"') quoted = true;
      else if (c === ",") { row.push(field); field = ""; }
      else if (c === "\n" || c === "\r") {
        if (c === "\r" && text[i + 1] === "\n") i++;
        row.push(field); field = "";
        rows.push(row); row = [];
      } else field += c;
    }
    if (field !== "" || row.length) { row.push(field); rows.push(row); }
    return rows.filter(function (r) { return r.length > 1 || r[0] !== ""; });
  }

  function previewDataset(input) {
    var box = input.form.querySelector("[data-local-preview]");
    var file = input.files && input.files[0];
    if (!box) return;
    box.textContent = "";
    box.hidden = !file;
    if (!file) return;
    if (file.size > 20 * 1024 * 1024) {
      box.textContent = file.name + ": " + (file.size / 1048576).toFixed(1) + " MB; the server checks it on upload.";
      return;
    }
    file.text().then(function (text) {
      var columns = [];
      var rows = [];
      var problems = [];
      var count = 0;
      if (/\.csv$/i.test(file.name)) {
        var table = parseCsv(text);
        columns = table[0] || [];
        table.slice(1).forEach(function (cells, index) {
          if (cells.length !== columns.length) problems.push("line " + (index + 2) + ": " + cells.length + " fields, the header has " + columns.length);
        });
        count = Math.max(table.length - 1, 0);
        rows = table.slice(1, 6);
      } else {
        text.split(/\r?\n/).forEach(function (line, index) {
          if (!line.trim()) return;
          try {
            var value = JSON.parse(line);
            if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not a JSON object");
            count += 1;
            Object.keys(value).forEach(function (key) { if (columns.indexOf(key) < 0) columns.push(key); });
            if (rows.length < 5) rows.push(value);
          } catch (error) {
            problems.push("line " + (index + 1) + ": " + error.message);
          }
        });
        rows = rows.map(function (value) {
          return columns.map(function (key) {
            var cell = value[key];
            return cell === undefined ? "" : typeof cell === "string" ? cell : JSON.stringify(cell);
          });
        });
      }
      var summary = document.createElement("p");
      summary.innerHTML = "";
      summary.textContent = count + " row" + (count === 1 ? "" : "s") + " · " + columns.length + " column" + (columns.length === 1 ? "" : "s") + (problems.length ? " · " + problems.length + " broken line" + (problems.length === 1 ? "" : "s") : "");
      box.appendChild(summary);
      if (problems.length) {
        var list = document.createElement("ul");
        list.className = "errorlist error-lines";
        problems.slice(0, 10).forEach(function (problem) {
          var item = document.createElement("li");
          item.textContent = problem;
          list.appendChild(item);
        });
        box.appendChild(list);
      }
      if (columns.length) {
        var wrap = document.createElement("div");
        wrap.className = "table-wrap";
        var tableNode = document.createElement("table");
        tableNode.className = "table compact";
        var head = tableNode.createTHead().insertRow();
        columns.forEach(function (name) {
          var th = document.createElement("th");
          th.textContent = name;
          head.appendChild(th);
        });
        var body = tableNode.createTBody();
        rows.forEach(function (cells) {
          var tr = body.insertRow();
          cells.forEach(function (cell) { tr.insertCell().textContent = String(cell).slice(0, 80); });
        });
        wrap.appendChild(tableNode);
        box.appendChild(wrap);
      }
    });
  }

  document.addEventListener("change", function (event) {
    if (event.target.matches && event.target.matches("[data-dataset-file]")) previewDataset(event.target);
  });

  // ---- start ---------------------------------------------------------------------------------------

  function init() {
    var page = document.querySelector("[data-run-page]");
    if (page) connectProgress(page);
    window.setInterval(tickDuration, 1000);
    var wizard = document.querySelector("[data-wizard]");
    if (wizard) window.flowStudioWizard = new Wizard(wizard);
    followLogs();
  }

  document.addEventListener("htmx:afterSettle", function (event) {
    followLogs();
    var form = document.querySelector("[data-line-selection]");
    if (form) updateRerun(form);
    // Swapped-in wizard parts must follow the step being shown.
    if (window.flowStudioWizard && event.target.closest && event.target.closest("[data-wizard]")) {
      window.flowStudioWizard.show(window.flowStudioWizard.current);
    }
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();

  window.flowStudioRuns = { applyProgress: applyProgress, refreshStatus: refreshStatus, active: ACTIVE };
})();
