// The test pane of the authoring page: talks to flows_app.consumers.FlowTestConsumer over one websocket.
// The server sends the form and history as HTML fragments and each test's events as JSON messages (see
// flows_app/streaming.py); this file only turns those into DOM updates and the form back into a request.
(function () {
  "use strict";

  var pane = document.getElementById("test-pane");
  if (!pane) return;

  var NO_RECONNECT = [4401, 4403, 4404];
  var socket = null;
  var retry = 0;
  var current = null; // the id of the test whose messages are shown
  var running = false;
  var chat = null; // {input, history, output} for chat flows
  var history = []; // the chat history carried turn to turn: [{inputs: {...}, outputs: {...}}]
  var pendingTurn = null; // the inputs of the chat turn being answered
  var outputsShown = {};
  var logCount = 0;
  var spanCount = 0;
  var version = null;

  function $(id) { return document.getElementById(id); }

  function setStatus(text, state) {
    var status = $("test-status");
    status.textContent = text;
    status.setAttribute("data-status", state);
  }

  function setRunning(on) {
    running = on;
    pane.setAttribute("data-running", on ? "true" : "false");
    $("test-cancel").hidden = !on;
    $("test-run").disabled = on || !socket || socket.readyState !== WebSocket.OPEN;
    pane.querySelectorAll("[data-test-send]").forEach(function (b) { b.disabled = on; });
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + pane.getAttribute("data-ws-path"));
    socket.onopen = function () { retry = 0; };
    socket.onmessage = function (event) { handle(JSON.parse(event.data)); };
    socket.onclose = function (event) {
      setRunning(false);
      $("test-run").disabled = true;
      if (NO_RECONNECT.indexOf(event.code) >= 0) {
        setStatus("Testing is not available here (" + event.code + ").", "closed");
        return;
      }
      retry = Math.min(retry + 1, 6);
      setStatus("Disconnected; reconnecting…", "connecting");
      setTimeout(connect, 500 * retry);
    };
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  }

  // -- messages -------------------------------------------------------------------------------------

  function handle(m) {
    if (m.type === "ready" || m.type === "form") {
      showForm(m);
      if (m.history !== undefined) $("test-history").innerHTML = m.history;
      if (!running) setStatus("Ready: tests run the saved version v" + m.version + ".", "idle");
      setRunning(running);
      return;
    }
    if (m.type === "history") { $("test-history").innerHTML = m.history; return; }
    if (m.type === "refused") {
      showError({ message: m.message }, "Not started");
      if (!running) setStatus(m.message, "refused");
      pendingTurn = null;
      return;
    }
    if (m.type === "record") { showRecord(m); return; }
    if (m.type === "started") { started(m); return; }
    if (m.test !== current) return; // a message of an earlier test that arrived late
    if (m.type === "chunk") appendChunk(m.output, m.delta);
    else if (m.type === "node") nodeBadge(m.node, m.status, m.duration_ms, m.error);
    else if (m.type === "stream") { Object.keys(m.outputs || {}).forEach(function (k) { setOutput(k, m.outputs[k]); }); }
    else if (m.type === "log") appendLog(m);
    else if (m.type === "span") { spanCount += 1; $("test-span-count").textContent = String(spanCount); }
    else if (m.type === "error") showError(m.error);
    else if (m.type === "done") finished(m);
  }

  function showForm(m) {
    var holder = $("test-form");
    var previous = holder.querySelector("#test-form-inner") ? collect(true) : null;
    holder.innerHTML = m.form;
    chat = m.chat || null;
    version = m.version;
    $("test-version").textContent = "v" + m.version;
    if (previous) restore(previous);
    if (chat) renderChat();
    pane.classList.toggle("test-chat-mode", !!chat);
  }

  function started(m) {
    current = m.test;
    outputsShown = {};
    logCount = 0;
    spanCount = 0;
    $("test-outputs").innerHTML = "";
    $("test-logs").textContent = "";
    $("test-log-count").textContent = "";
    $("test-span-count").textContent = "";
    $("test-nodes").innerHTML = "";
    $("test-error").hidden = true;
    $("test-trace").innerHTML = '<p class="muted small">The trace shows when the test ends.</p>';
    clearDagBadges();
    setRunning(true);
    setStatus("Running test #" + m.test + " on v" + m.version + (m.variant ? " with " + m.variant : "") + (m.node ? ", node " + m.node + " only" : "") + "…", "running");
    if (chat && pendingTurn) addBubble("user", pendingTurn.inputs[chat.input]);
    if (chat && pendingTurn) addBubble("assistant", "", true);
  }

  function finished(m) {
    setRunning(false);
    Object.keys(m.outputs || {}).forEach(function (k) { setOutput(k, m.outputs[k]); });
    Object.keys(m.node_runs || {}).forEach(function (n) {
      var run = m.node_runs[n];
      nodeBadge(n, run.status, run.duration_ms, run.error);
    });
    if (m.error) showError(m.error);
    $("test-trace").innerHTML = m.trace;
    $("test-history").innerHTML = m.history;
    var tokens = m.usage && m.usage.total_tokens ? " · " + m.usage.total_tokens + " tokens" : "";
    setStatus("Test #" + m.test + " " + m.status.toLowerCase() + " in " + Math.round(m.duration_ms) + " ms" + tokens + ".", m.status.toLowerCase());
    if (chat && pendingTurn) {
      var bubble = lastAssistant();
      if (m.status === "Completed") {
        var answer = m.outputs[chat.output];
        if (bubble) { bubble.textContent = typeof answer === "string" ? answer : JSON.stringify(answer); bubble.classList.remove("streaming"); }
        history.push({ inputs: pendingTurn.inputs, outputs: m.outputs });
      } else if (bubble) {
        bubble.classList.remove("streaming");
        bubble.classList.add("chat-failed");
        if (!bubble.textContent) bubble.textContent = m.status === "Canceled" ? "(canceled)" : "(failed: see the error)";
      }
    }
    pendingTurn = null;
  }

  // -- outputs, logs, errors, node badges --------------------------------------------------------------

  function outputBox(name) {
    var box = $("test-outputs").querySelector('[data-output="' + CSS.escape(name) + '"]');
    if (box) return box;
    var wrap = document.createElement("div");
    wrap.className = "test-output";
    var label = document.createElement("div");
    label.className = "test-output-name mono small";
    label.textContent = name;
    box = document.createElement("pre");
    box.className = "test-output-value";
    box.setAttribute("data-output", name);
    wrap.appendChild(label);
    wrap.appendChild(box);
    $("test-outputs").appendChild(wrap);
    return box;
  }

  function appendChunk(name, delta) {
    var box = outputBox(name);
    box.classList.add("streaming");
    box.appendChild(document.createTextNode(delta));
    outputsShown[name] = true;
    if (chat && pendingTurn && name === chat.output) {
      var bubble = lastAssistant();
      if (bubble) bubble.appendChild(document.createTextNode(delta));
      scrollChat();
    }
  }

  function setOutput(name, value) {
    var box = outputBox(name);
    box.classList.remove("streaming");
    box.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function appendLog(m) {
    var line = document.createElement("span");
    line.className = "log-line log-" + m.stream;
    line.textContent = (m.node ? "[" + m.node + "] " : "") + m.text + (/\n$/.test(m.text) ? "" : "\n");
    $("test-logs").appendChild(line);
    logCount += 1;
    $("test-log-count").textContent = String(logCount);
  }

  function showError(error, title) {
    var box = $("test-error");
    box.hidden = false;
    box.innerHTML = "";
    var head = document.createElement("div");
    head.className = "test-error-title";
    head.textContent = (title || (error.node ? "Node '" + error.node + "' failed" : "Error")) + (error.type ? " (" + error.type + ")" : "");
    var message = document.createElement("div");
    message.className = "test-error-message";
    message.textContent = error.message || "";
    box.appendChild(head);
    box.appendChild(message);
    if (error.traceback) {
      var trace = document.createElement("pre");
      trace.className = "test-traceback";
      trace.textContent = error.traceback;
      box.appendChild(trace);
    }
  }

  function dagNode(name) {
    return document.querySelector('#dag-main .dag-node[data-id="node:' + CSS.escape(name) + '"]');
  }

  function clearDagBadges() {
    document.querySelectorAll("#dag-main .dag-node[data-run]").forEach(function (group) {
      group.removeAttribute("data-run");
      var badge = group.querySelector(".dag-run-badge");
      if (badge) badge.remove();
    });
  }

  function nodeBadge(name, status, durationMs, error) {
    var text = status + (durationMs !== undefined && durationMs !== null ? " · " + formatMs(durationMs) : "");
    var row = $("test-nodes").querySelector('[data-node="' + CSS.escape(name) + '"]');
    if (!row) {
      row = document.createElement("li");
      row.setAttribute("data-node", name);
      row.innerHTML = '<span class="mono"></span> <span class="test-pill"></span>';
      row.firstChild.textContent = name;
      $("test-nodes").appendChild(row);
    }
    row.setAttribute("data-status", status);
    var pill = row.querySelector(".test-pill");
    pill.className = "test-pill test-pill-" + status;
    pill.textContent = text;
    if (error && error.message) row.title = error.message;
    var group = dagNode(name);
    if (!group) return;
    group.setAttribute("data-run", status);
    var svg = "http://www.w3.org/2000/svg";
    var badge = group.querySelector(".dag-run-badge");
    if (!badge) {
      badge = document.createElementNS(svg, "g");
      badge.setAttribute("class", "dag-run-badge");
      var rect = document.createElementNS(svg, "rect");
      rect.setAttribute("rx", "7");
      rect.setAttribute("height", "15");
      var label = document.createElementNS(svg, "text");
      label.setAttribute("x", "6");
      label.setAttribute("y", "11");
      badge.appendChild(rect);
      badge.appendChild(label);
      group.appendChild(badge);
    }
    var box = group.querySelector(".dag-box");
    var height = box ? parseFloat(box.getAttribute("height")) : 46;
    badge.querySelector("text").textContent = text;
    badge.querySelector("rect").setAttribute("width", String(8 + text.length * 6));
    badge.setAttribute("transform", "translate(6," + (height + 3) + ")");
  }

  function formatMs(ms) {
    return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms";
  }

  // -- chat -------------------------------------------------------------------------------------------

  function chatLog() { return $("test-chat-log"); }

  function addBubble(role, text, streaming) {
    var log = chatLog();
    if (!log) return null;
    var empty = log.querySelector(".chat-empty");
    if (empty) empty.remove();
    var bubble = document.createElement("div");
    bubble.className = "chat-bubble chat-" + role + (streaming ? " streaming" : "");
    bubble.setAttribute("data-role", role);
    bubble.textContent = text || "";
    log.appendChild(bubble);
    scrollChat();
    return bubble;
  }

  function lastAssistant() {
    var log = chatLog();
    var all = log ? log.querySelectorAll(".chat-assistant") : [];
    return all.length ? all[all.length - 1] : null;
  }

  function scrollChat() {
    var log = chatLog();
    if (log) log.scrollTop = log.scrollHeight;
  }

  function renderChat() {
    history.forEach(function (turn) {
      addBubble("user", turn.inputs[chat.input]);
      var answer = turn.outputs[chat.output];
      addBubble("assistant", typeof answer === "string" ? answer : JSON.stringify(answer));
    });
  }

  // -- the form ---------------------------------------------------------------------------------------

  function fieldValue(el) {
    var widget = el.getAttribute("data-widget");
    if (widget === "bool") return { ok: true, value: el.checked };
    var text = el.value;
    if (widget === "number") {
      if (text === "") return { ok: true, skip: true };
      var type = el.getAttribute("data-type");
      var number = type === "int" || type === "integer" ? parseInt(text, 10) : parseFloat(text);
      if (isNaN(number)) return { ok: false, error: "not a number" };
      return { ok: true, value: number };
    }
    if (widget === "json") {
      if (text.trim() === "") return { ok: true, skip: true };
      try {
        return { ok: true, value: JSON.parse(text) };
      } catch (e) {
        return { ok: false, error: "not valid JSON: " + e.message };
      }
    }
    return { ok: true, value: text };
  }

  function gather(selector, attr, into, errors) {
    pane.querySelectorAll(selector).forEach(function (el) {
      var name = el.getAttribute(attr);
      var result = fieldValue(el);
      var note = el.parentNode.querySelector(".test-json-error");
      if (note) { note.hidden = result.ok; note.textContent = result.ok ? "" : result.error; }
      el.classList.toggle("invalid", !result.ok);
      if (!result.ok) errors.push(name + ": " + result.error);
      else if (!result.skip) into[name] = result.value;
    });
  }

  // The request for a test; `raw` keeps field text as typed (to restore it after the form is redrawn).
  function collect(raw) {
    if (raw) {
      var saved = {};
      pane.querySelectorAll("[data-input], [data-init], [data-node-input]").forEach(function (el) {
        var key = (el.hasAttribute("data-input") ? "i:" + el.getAttribute("data-input") : el.hasAttribute("data-init") ? "n:" + el.getAttribute("data-init") : "o:" + el.getAttribute("data-node-input"));
        saved[key] = el.type === "checkbox" ? el.checked : el.value;
      });
      var variant = $("test-variant");
      var node = $("test-node");
      saved.variant = variant ? variant.value : "";
      saved.node = node ? node.value : "";
      return saved;
    }
    var errors = [];
    var node = $("test-node") ? $("test-node").value : "";
    var inputs = {};
    var init = {};
    gather("[data-flow-fields] [data-input]", "data-input", inputs, errors);
    gather("[data-init]", "data-init", init, errors);
    if (node) {
      var fieldset = pane.querySelector('[data-node-fields="' + CSS.escape(node) + '"]');
      gather('[data-node-fields="' + CSS.escape(node) + '"] [data-node-input]', "data-node-input", inputs, errors);
      if (!fieldset) errors.push("unknown node " + node);
    }
    return { errors: errors, request: { action: "run", inputs: inputs, init: init, node: node, variant: $("test-variant") ? $("test-variant").value : "" } };
  }

  function restore(saved) {
    pane.querySelectorAll("[data-input], [data-init], [data-node-input]").forEach(function (el) {
      var key = (el.hasAttribute("data-input") ? "i:" + el.getAttribute("data-input") : el.hasAttribute("data-init") ? "n:" + el.getAttribute("data-init") : "o:" + el.getAttribute("data-node-input"));
      if (!(key in saved)) return;
      if (el.type === "checkbox") el.checked = saved[key];
      else el.value = saved[key];
    });
    var variant = $("test-variant");
    if (variant && saved.variant && variant.querySelector('option[value="' + CSS.escape(saved.variant) + '"]')) variant.value = saved.variant;
    var node = $("test-node");
    if (node && saved.node && node.querySelector('option[value="' + CSS.escape(saved.node) + '"]')) { node.value = saved.node; showNodeFields(); }
  }

  function showNodeFields() {
    var node = $("test-node") ? $("test-node").value : "";
    pane.querySelectorAll("[data-node-fields]").forEach(function (fs) { fs.hidden = fs.getAttribute("data-node-fields") !== node; });
    var flowFields = pane.querySelector("[data-flow-fields]");
    if (flowFields) flowFields.hidden = !!node;
    var chatBox = pane.querySelector("[data-test-chat]");
    if (chatBox) chatBox.hidden = !!node;
  }

  function run() {
    if (running || !socket || socket.readyState !== WebSocket.OPEN) return;
    var built = collect(false);
    if (built.errors.length) {
      showError({ message: built.errors.join("; ") }, "Check the inputs");
      setStatus("Some inputs are not valid.", "refused");
      return;
    }
    if (chat && !built.request.node) {
      var message = $("test-message");
      var text = message ? message.value : "";
      built.request.inputs[chat.input] = text;
      if (chat.history) built.request.inputs[chat.history] = history.slice();
      var turnInputs = {};
      Object.keys(built.request.inputs).forEach(function (k) { if (k !== chat.history) turnInputs[k] = built.request.inputs[k]; });
      pendingTurn = { inputs: turnInputs };
      if (message) message.value = "";
    }
    send(built.request);
  }

  // -- history ----------------------------------------------------------------------------------------

  function showRecord(m) {
    var t = m.test;
    current = t.id;
    $("test-outputs").innerHTML = "";
    $("test-nodes").innerHTML = "";
    $("test-error").hidden = true;
    clearDagBadges();
    Object.keys(t.outputs || {}).forEach(function (k) { setOutput(k, t.outputs[k]); });
    Object.keys(t.node_runs || {}).forEach(function (n) { var r = t.node_runs[n]; nodeBadge(n, r.status, r.duration_ms, r.error); });
    if (t.error) showError(t.error);
    $("test-logs").textContent = "";
    logCount = 0;
    (t.logs || []).forEach(appendLog);
    $("test-trace").innerHTML = m.trace;
    $("test-span-count").textContent = "";
    // Put its inputs back into the form so it can be run again as it was.
    pane.querySelectorAll("[data-flow-fields] [data-input]").forEach(function (el) {
      var name = el.getAttribute("data-input");
      if (!(name in t.inputs)) return;
      var value = t.inputs[name];
      if (el.type === "checkbox") el.checked = !!value;
      else if (el.getAttribute("data-widget") === "json") el.value = JSON.stringify(value, null, 2);
      else el.value = typeof value === "string" ? value : JSON.stringify(value);
    });
    if (chat && chat.history && Array.isArray(t.inputs[chat.history])) {
      history = t.inputs[chat.history].slice();
      if (t.status === "Completed") history.push({ inputs: withoutHistory(t.inputs), outputs: t.outputs });
      var log = chatLog();
      if (log) { log.innerHTML = ""; renderChat(); }
    }
    setStatus("Showing test #" + t.id + " (" + t.status.toLowerCase() + ", v" + t.version + ", " + (t.user || "unknown") + ").", "record");
    selectTab("output");
  }

  function withoutHistory(inputs) {
    var copy = {};
    Object.keys(inputs).forEach(function (k) { if (k !== chat.history) copy[k] = inputs[k]; });
    return copy;
  }

  function selectTab(name) {
    pane.querySelectorAll("[data-test-tab]").forEach(function (tab) {
      var on = tab.getAttribute("data-test-tab") === name;
      tab.classList.toggle("active", on);
      tab.setAttribute("aria-selected", on ? "true" : "false");
    });
    pane.querySelectorAll("[data-test-panel]").forEach(function (panel) { panel.hidden = panel.getAttribute("data-test-panel") !== name; });
  }

  // -- wiring -----------------------------------------------------------------------------------------

  pane.addEventListener("click", function (event) {
    var target = event.target;
    if (target.closest("[data-test-run]") || target.closest("[data-test-send]")) { event.preventDefault(); run(); return; }
    if (target.closest("[data-test-cancel]")) { send({ action: "cancel" }); setStatus("Canceling…", "running"); return; }
    if (target.closest("[data-test-clear]")) { history = []; var log = chatLog(); if (log) log.innerHTML = ""; return; }
    var tab = target.closest("[data-test-tab]");
    if (tab) { selectTab(tab.getAttribute("data-test-tab")); if (tab.getAttribute("data-test-tab") === "history") send({ action: "history" }); return; }
    var row = target.closest("[data-test-open]");
    if (row) { send({ action: "open", id: parseInt(row.getAttribute("data-test-open"), 10) }); return; }
    var toggle = target.closest("[data-test-toggle]");
    if (toggle) {
      var open = pane.getAttribute("data-open") !== "true";
      pane.setAttribute("data-open", open ? "true" : "false");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
      toggle.textContent = (open ? "\u25be" : "\u25b8") + " Test";
    }
  });

  pane.addEventListener("change", function (event) {
    if (event.target.matches("[data-test-node]")) showNodeFields();
  });

  pane.addEventListener("keydown", function (event) {
    if (event.target.matches("[data-test-message]") && event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      run();
      return;
    }
    var row = event.target.closest("[data-test-open]");
    if (row && event.key === "Enter") send({ action: "open", id: parseInt(row.getAttribute("data-test-open"), 10) });
  });

  pane.addEventListener("submit", function (event) { event.preventDefault(); run(); });

  document.addEventListener("keydown", function (event) {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); run(); }
  });

  // A save makes a new head: the form follows it (new inputs, nodes, variants), keeping what was typed.
  document.addEventListener("htmx:afterSettle", function () {
    var badge = document.getElementById("ws-version");
    var shown = badge ? parseInt(badge.getAttribute("data-version"), 10) : null;
    if (shown && version && shown > version) send({ action: "form" });
  });

  window.flowStudioTest = { run: run, send: send };
  connect();
})();
