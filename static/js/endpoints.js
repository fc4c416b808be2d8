// Endpoint pages and the deploy wizard: wizard steps, the traffic total, the Test tab (a real call to the
// endpoint, its SSE stream read from fetch's ReadableStream), copy buttons and the monitoring chart.
(function () {
  "use strict";

  // ---- the deploy wizard ------------------------------------------------------------------------------

  function DeployWizard(form) {
    this.form = form;
    this.stepper = document.querySelector("[data-deploy-stepper]");
    this.steps = ["1", "2", "3", "4"];
    this.back = form.querySelector("[data-wizard-back]");
    this.next = form.querySelector("[data-wizard-next]");
    this.submit = form.querySelector("[data-wizard-submit]");
    form.classList.add("wizard-js");
    var self = this;
    this.back.addEventListener("click", function () { self.move(-1); });
    this.next.addEventListener("click", function () { self.move(1); });
    if (this.stepper) {
      this.stepper.addEventListener("click", function (event) {
        var link = event.target.closest("[data-goto]");
        if (!link) return;
        event.preventDefault();
        self.show(link.getAttribute("data-goto"), true);
      });
    }
    form.addEventListener("change", function (event) {
      if (event.target.name === "endpoint_mode") self.mode();
    });
    this.mode();
    var error = form.querySelector(".errorlist");
    var errorStep = error && error.closest("[data-step]");
    this.show(errorStep ? errorStep.getAttribute("data-step") : "1", !!errorStep);
  }

  DeployWizard.prototype.mode = function () {
    var checked = this.form.querySelector('input[name="endpoint_mode"]:checked');
    var mode = checked ? checked.value : "new";
    this.form.querySelectorAll("[data-mode]").forEach(function (node) {
      node.hidden = node.getAttribute("data-mode") !== mode;
    });
  };

  DeployWizard.prototype.move = function (delta) {
    var index = this.steps.indexOf(this.current) + delta;
    if (index >= 0 && index < this.steps.length) this.show(this.steps[index], true);
  };

  DeployWizard.prototype.show = function (step, focus) {
    this.current = step;
    this.form.querySelectorAll("[data-step]").forEach(function (node) {
      node.classList.toggle("current", node.getAttribute("data-step") === step);
    });
    var index = this.steps.indexOf(step);
    var last = index === this.steps.length - 1;
    this.back.hidden = index === 0;
    this.next.hidden = last;
    this.submit.hidden = !last;
    var form = this.form;
    if (this.stepper) {
      this.stepper.querySelectorAll("[data-goto]").forEach(function (link) {
        var mine = link.getAttribute("data-goto");
        if (mine === step) link.setAttribute("aria-current", "step");
        else link.removeAttribute("aria-current");
        link.classList.toggle("has-error", !!form.querySelector('[data-step="' + mine + '"] .errorlist'));
      });
    }
    if (last) this.fillReview();
    if (focus) {
      var first = form.querySelector('[data-step="' + step + '"] :is(select, input:not([type=hidden]), textarea)');
      if (first && first.offsetParent !== null) first.focus();
    }
  };

  DeployWizard.prototype.fillReview = function () {
    var list = this.form.querySelector("[data-deploy-review]");
    if (!list) return;
    list.querySelectorAll("[data-added]").forEach(function (node) { node.remove(); });
    var form = this.form;
    function value(name) {
      var field = form.querySelector('[name="' + name + '"]');
      return field ? field.value : "";
    }
    var mode = (form.querySelector('input[name="endpoint_mode"]:checked') || {}).value || "new";
    var rows = [
      ["Endpoint", mode === "new" ? value("endpoint_name") + " (new)" : value("endpoint") + " (existing)"],
      ["Deployment", value("deployment")],
      ["Runners", value("instance_count")],
      ["Auth", "key (primary + secondary)"],
    ];
    var outputs = Array.prototype.map.call(form.querySelectorAll('input[name="outputs"]:checked'), function (box) {
      return box.value;
    });
    rows.push(["Outputs", outputs.join(", ") || "— none chosen —"]);
    form.querySelectorAll('select[name^="conn__"]').forEach(function (select) {
      rows.push(["Connection " + select.name.slice(6), select.value || "— none —"]);
    });
    rows.forEach(function (row) {
      var dt = document.createElement("dt");
      dt.textContent = row[0];
      dt.setAttribute("data-added", "");
      var dd = document.createElement("dd");
      dd.textContent = row[1];
      dd.setAttribute("data-added", "");
      list.appendChild(dt);
      list.appendChild(dd);
    });
  };

  // ---- traffic split ---------------------------------------------------------------------------------

  function trafficTotal(form) {
    var total = 0;
    form.querySelectorAll("[data-traffic-input]").forEach(function (input) {
      total += parseInt(input.value, 10) || 0;
    });
    var label = form.querySelector("[data-traffic-total]");
    if (label) {
      label.textContent = "Total " + total + "%";
      label.classList.toggle("traffic-total-bad", total !== 100 && total !== 0);
    }
  }

  // ---- the Test tab: a real request to the endpoint ----------------------------------------------------

  async function readEvents(response, onEvent) {
    // SSE from fetch: a ReadableStream of text; events end with a blank line.
    var reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    var buffer = "";
    for (;;) {
      var step = await reader.read();
      if (step.done) break;
      buffer += step.value;
      var end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        var chunk = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        var data = chunk.split("\n").filter(function (line) { return line.indexOf("data:") === 0; })
          .map(function (line) { return line.slice(5).replace(/^ /, ""); }).join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  function Tester(root) {
    this.root = root;
    this.url = root.getAttribute("data-score-url");
    this.token = root.getAttribute("data-token");
    this.chatInput = root.getAttribute("data-chat-input");
    this.chatHistory = root.getAttribute("data-chat-history");
    this.chatOutput = root.getAttribute("data-chat-output");
    this.status = root.querySelector("[data-test-status]");
    this.output = root.querySelector("[data-test-output]");
    this.history = [];
    var self = this;
    var chat = root.querySelector("[data-chat-form]");
    if (chat) {
      chat.addEventListener("submit", function (event) { event.preventDefault(); self.sendChat(); });
      chat.querySelector("[data-chat-question]").addEventListener("keydown", function (event) {
        if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); self.sendChat(); }
      });
      root.querySelector("[data-chat-clear]").addEventListener("click", function () {
        self.history = [];
        root.querySelector("[data-chat-log]").textContent = "";
      });
    }
    var plain = root.querySelector("[data-test-form]");
    if (plain) plain.addEventListener("submit", function (event) { event.preventDefault(); self.sendPlain(); });
    // Any call starts the deployment's runners: ask for /health now so the first message does not wait for them.
    fetch(this.url.replace(/\/score$/, "/health"), { headers: { "Authorization": "Bearer " + this.token } })
      .catch(function () { return null; });
  }

  Tester.prototype.call = async function (body, onEvent) {
    var headers = {
      "Authorization": "Bearer " + this.token,
      "Content-Type": "application/json",
      "Accept": this.root.querySelector("[data-test-stream]").checked ? "text/event-stream" : "application/json",
    };
    var pinned = this.root.querySelector("[data-test-deployment]").value;
    if (pinned) headers["azureml-model-deployment"] = pinned;
    var started = performance.now();
    this.status.textContent = "Calling…";
    var response = await fetch(this.url, { method: "POST", headers: headers, body: JSON.stringify(body) });
    var about = "HTTP " + response.status + " · deployment " + (response.headers.get("x-flowstudio-deployment") || "—") +
      " · snapshot " + (response.headers.get("x-flowstudio-snapshot") || "—").slice(0, 12);
    this.status.textContent = about;
    this.root.setAttribute("data-last-deployment", response.headers.get("x-flowstudio-deployment") || "");
    var type = response.headers.get("content-type") || "";
    if (type.indexOf("text/event-stream") === 0) {
      await readEvents(response, onEvent);
    } else {
      onEvent(await response.json(), true);
    }
    this.status.textContent = about + " · " + Math.round(performance.now() - started) + " ms";
    return response;
  };

  Tester.prototype.extraInputs = function () {
    var extra = this.root.querySelector("[data-test-extra]");
    if (!extra || !extra.value.trim()) return {};
    return JSON.parse(extra.value);
  };

  Tester.prototype.sendChat = async function () {
    var box = this.root.querySelector("[data-chat-question]");
    var question = box.value.trim();
    if (!question) return;
    var log = this.root.querySelector("[data-chat-log]");
    var body;
    try {
      body = this.extraInputs();
    } catch (error) {
      this.status.textContent = "Other inputs are not valid JSON: " + error.message;
      return;
    }
    body[this.chatInput] = question;
    if (this.chatHistory) body[this.chatHistory] = this.history.slice();
    var mine = document.createElement("div");
    mine.className = "chat-msg user";
    mine.textContent = question;
    log.appendChild(mine);
    var answer = document.createElement("div");
    answer.className = "chat-msg assistant";
    answer.setAttribute("data-chat-answer", "");
    log.appendChild(answer);
    box.value = "";
    var outputs = {};
    var name = this.chatOutput;
    this.output.textContent = "";
    var self = this;
    var response = await this.call(body, function (event, whole) {
      self.output.textContent += JSON.stringify(event) + "\n";
      if (event && event.error) {
        answer.classList.add("error");
        answer.textContent = event.error.message;
        return;
      }
      Object.keys(event || {}).forEach(function (key) {
        if (!whole && typeof event[key] === "string" && key === name) outputs[key] = (outputs[key] || "") + event[key];
        else outputs[key] = event[key];
      });
      var text = outputs[name];
      answer.textContent = typeof text === "string" ? text : JSON.stringify(outputs);
      log.scrollTop = log.scrollHeight;
    });
    answer.setAttribute("data-done", "");
    if (response.ok && !answer.classList.contains("error")) {
      var turn = { inputs: {}, outputs: outputs };
      turn.inputs[this.chatInput] = question;
      this.history.push(turn);
    }
  };

  Tester.prototype.sendPlain = async function () {
    var body;
    try {
      body = JSON.parse(this.root.querySelector("[data-test-body]").value || "{}");
    } catch (error) {
      this.status.textContent = "The body is not valid JSON: " + error.message;
      return;
    }
    this.output.textContent = "";
    var self = this;
    await this.call(body, function (event) {
      self.output.textContent += JSON.stringify(event, null, event && Object.keys(event).length > 1 ? 2 : 0) + "\n";
    });
    this.output.setAttribute("data-done", "");
  };

  // ---- monitoring chart ------------------------------------------------------------------------------

  function drawChart(canvas) {
    var data = document.getElementById("monitor-data");
    if (!data || !window.Chart) return;
    var chart = JSON.parse(data.textContent);
    if (canvas.chart) canvas.chart.destroy();
    var labels = chart.labels.map(function (iso) {
      var when = new Date(iso);
      return when.toLocaleString([], { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });
    });
    canvas.chart = new window.Chart(canvas, {
      data: {
        labels: labels,
        datasets: [
          { type: "bar", label: "Requests", data: chart.requests, yAxisID: "count" },
          { type: "bar", label: "Errors", data: chart.errors, yAxisID: "count" },
          { type: "line", label: "p50 ms", data: chart.p50, yAxisID: "ms", spanGaps: true },
          { type: "line", label: "p95 ms", data: chart.p95, yAxisID: "ms", spanGaps: true },
        ],
      },
      options: {
        maintainAspectRatio: false,
        animation: false,
        scales: {
          count: { type: "linear", position: "left", beginAtZero: true, ticks: { precision: 0 } },
          ms: { type: "linear", position: "right", beginAtZero: true, grid: { drawOnChartArea: false } },
        },
      },
    });
  }

  // ---- wiring ----------------------------------------------------------------------------------------

  function init(root) {
    var wizard = root.querySelector ? root.querySelector("[data-deploy-wizard]") : null;
    if (wizard && !wizard.deployWizard) wizard.deployWizard = new DeployWizard(wizard);
    root.querySelectorAll("[data-traffic-form]").forEach(trafficTotal);
    root.querySelectorAll("[data-endpoint-test]").forEach(function (node) {
      if (!node.tester) node.tester = new Tester(node);
    });
    root.querySelectorAll("[data-monitor-chart]").forEach(drawChart);
  }

  document.addEventListener("input", function (event) {
    if (event.target.matches && event.target.matches("[data-traffic-input]")) trafficTotal(event.target.form);
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button || !navigator.clipboard) return;
    navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
      button.textContent = "Copied";
    });
  });
  document.addEventListener("htmx:afterSwap", function (event) { init(event.target.parentNode || document); });
  init(document);
})();
