// The authoring workspace: CodeMirror on every [data-editor] textarea, Ctrl/Cmd+S to save through htmx,
// the conflict view on a stale save (409), the file filter, uploads with folder paths, and keyboard shortcuts.
(function () {
  "use strict";

  var MODES = {
    yaml: "yaml",
    python: "python",
    jinja2: "jinja2",
    json: { name: "javascript", json: true },
    markdown: "markdown",
    prompty: { name: "yaml-frontmatter", base: "markdown" },
    text: "text/plain",
  };
  var editors = [];

  function workspace() {
    return document.getElementById("workspace");
  }

  function currentVersion() {
    var badge = document.getElementById("ws-version");
    return badge ? badge.getAttribute("data-version") : null;
  }

  function canEdit() {
    var ws = workspace();
    return ws && ws.getAttribute("data-can-edit") === "true";
  }

  function setDirty(form, dirty) {
    var editor = form.closest(".editor");
    form._dirty = dirty;
    var dot = editor && editor.querySelector(".dirty-dot");
    if (dot) dot.hidden = !dirty;
  }

  function anyDirty() {
    return editors.some(function (cm) {
      var form = cm.getTextArea().form;
      return form && form.isConnected && form._dirty;
    });
  }

  function save(cm) {
    var textarea = cm.getTextArea();
    var form = textarea.form;
    // One save at a time: a second Ctrl+S while the first is on its way would be based on the same version.
    if (!form || !form.getAttribute("hx-post") || form.classList.contains("htmx-request")) return;
    cm.save();
    htmx.trigger(form, "submit");
  }

  function initEditor(textarea) {
    if (textarea._cm || typeof CodeMirror === "undefined") return;
    var readOnly = textarea.hasAttribute("data-readonly");
    var cm = CodeMirror.fromTextArea(textarea, {
      mode: MODES[textarea.getAttribute("data-mode")] || "text/plain",
      lineNumbers: true,
      lineWrapping: false,
      indentUnit: textarea.getAttribute("data-mode") === "python" ? 4 : 2,
      tabSize: 4,
      indentWithTabs: false,
      matchBrackets: true,
      styleActiveLine: true,
      readOnly: readOnly,
      theme: "studio",
      viewportMargin: 50,
      extraKeys: {
        "Ctrl-S": function (instance) { save(instance); },
        "Cmd-S": function (instance) { save(instance); },
        Tab: function (instance) {
          if (instance.somethingSelected()) instance.indentSelection("add");
          else instance.replaceSelection(Array(instance.getOption("indentUnit") + 1).join(" "), "end");
        },
        "Shift-Tab": function (instance) { instance.indentSelection("subtract"); },
      },
    });
    textarea._cm = cm;
    cm._studioTextarea = textarea;
    editors = editors.filter(function (other) { return other.getTextArea().isConnected; });
    editors.push(cm);
    var form = textarea.form;
    if (form) {
      setDirty(form, false);
      cm.on("change", function () { setDirty(form, true); });
    }
    var editorBox = textarea.closest(".editor");
    var line = parseInt(editorBox && editorBox.getAttribute("data-line"), 10);
    if (line > 0) {
      cm.setCursor({ line: line - 1, ch: 0 });
      cm.scrollIntoView({ line: line - 1, ch: 0 }, 120);
      cm.addLineClass(line - 1, "background", "cm-jump-line");
    }
    if (!readOnly && !textarea.closest(".conflict")) cm.focus();
  }

  function initEditors(root) {
    (root || document).querySelectorAll("textarea[data-editor]").forEach(initEditor);
    markSelected();
  }

  function activeEditor() {
    for (var i = editors.length - 1; i >= 0; i--) {
      if (editors[i].getTextArea().isConnected) return editors[i];
    }
    return null;
  }

  function markSelected() {
    var editor = document.getElementById("editor");
    var path = editor ? editor.getAttribute("data-path") : null;
    document.querySelectorAll(".tree-file").forEach(function (item) {
      item.classList.toggle("selected", item.getAttribute("data-path") === path);
    });
  }

  function openFile(path, line) {
    var ws = workspace();
    if (!ws || !path) return;
    if (anyDirty() && !window.confirm("Discard your unsaved changes?")) return;
    var query = "?file=" + encodeURIComponent(path) + (line ? "&line=" + line : "");
    var pinned = ws.getAttribute("data-pinned-version");
    if (pinned) query += "&version=" + pinned;
    htmx.ajax("GET", ws.getAttribute("data-file-url") + query, { target: "#ws-editor", swap: "innerHTML" }).then(function () {
      history.pushState({}, "", ws.getAttribute("data-detail-url") + query);
    });
  }

  // Every write from the workspace carries the version the page shows, unless the form names its own.
  document.addEventListener("htmx:configRequest", function (event) {
    if (!workspace() || !event.detail.elt.closest || !event.detail.elt.closest("#workspace")) return;
    var params = event.detail.parameters;
    var has = typeof params.get === "function" ? params.get("based_on") : params.based_on;
    if (!has && event.detail.verb !== "get") {
      if (typeof params.set === "function") params.set("based_on", currentVersion());
      else params.based_on = currentVersion();
    }
  });

  // A save answered 409 carries the conflict view: show it instead of treating it as an error.
  document.addEventListener("htmx:beforeSwap", function (event) {
    if (event.detail.xhr && event.detail.xhr.status === 409) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  document.addEventListener("htmx:confirm", function (event) {
    // Leaving a file with unsaved changes asks first.
    var elt = event.detail.elt;
    if (elt.getAttribute && elt.getAttribute("hx-target") === "#ws-editor" && elt.getAttribute("hx-get") && anyDirty()) {
      event.preventDefault();
      if (window.confirm("Discard your unsaved changes?")) {
        editors.forEach(function (cm) { if (cm.getTextArea().form) setDirty(cm.getTextArea().form, false); });
        event.detail.issueRequest(true);
      }
    }
  });

  document.addEventListener("flow-changed", function (event) {
    var detail = event.detail || {};
    document.querySelectorAll("[data-current-version]").forEach(function (input) { input.value = detail.version; });
    var editor = document.getElementById("editor");
    var openPath = editor ? editor.getAttribute("data-path") : null;
    if (detail.saved) {
      if (detail.merged) {
        openFile(detail.path);
        return;
      }
      var cm = activeEditor();
      if (cm && openPath === detail.path) {
        var based = cm.getTextArea().form.querySelector("[data-editor-based-on]");
        if (based) based.value = detail.version;
        setDirty(cm.getTextArea().form, false);
      }
      return;
    }
    var gone = detail.deleted && openPath && (openPath === detail.deleted || openPath.indexOf(detail.deleted + "/") === 0);
    var moved = detail.renamed && openPath && (openPath === detail.renamed || openPath.indexOf(detail.renamed + "/") === 0);
    if (moved) openFile(detail.path + openPath.slice(detail.renamed.length));
    else if (gone) openFile("flow.dag.yaml");
    else if (detail.opened && detail.path) openFile(detail.path);
    markSelected();
  });

  document.addEventListener("htmx:afterSettle", function () { initEditors(document); });
  document.addEventListener("htmx:oobAfterSwap", function () { initEditors(document); });

  document.addEventListener("click", function (event) {
    var problem = event.target.closest("[data-open-file]");
    if (problem && problem.getAttribute("data-open-file")) {
      openFile(problem.getAttribute("data-open-file"), problem.getAttribute("data-open-line"));
      return;
    }
    var rename = event.target.closest("[data-rename]");
    if (rename) {
      var path = rename.getAttribute("data-rename");
      var next = window.prompt("Rename or move " + path + " to", path);
      if (!next || next === path) return;
      htmx.ajax("POST", workspace().getAttribute("data-rename-url"), {
        target: "#ws-status",
        swap: "innerHTML",
        source: rename,
        values: { path: path, new_path: next },
      });
    }
  });

  document.addEventListener("dag:open", function (event) {
    openFile(event.detail.file, event.detail.line);
  });

  // Browsers drop folders from uploaded file names: send each file's relative path alongside.
  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input.matches && input.matches("input[data-upload]")) {
      var names = Array.prototype.map.call(input.files, function (file) {
        return file.webkitRelativePath || file.name;
      });
      input.form.querySelector("input[name=paths]").value = JSON.stringify(names);
    } else if (input.matches && input.matches("input[data-submit-on-change]")) {
      var version = input.form.querySelector("[data-current-version]");
      if (version) version.value = currentVersion();
      input.form.submit();
    }
  }, true);

  document.addEventListener("input", function (event) {
    if (!event.target.matches("[data-file-filter]")) return;
    var needle = event.target.value.trim().toLowerCase();
    document.querySelectorAll(".tree-file").forEach(function (item) {
      item.hidden = needle !== "" && item.getAttribute("data-path").toLowerCase().indexOf(needle) === -1;
    });
    document.querySelectorAll(".tree-dir").forEach(function (dir) {
      var shown = dir.querySelector(".tree-file:not([hidden])");
      dir.hidden = needle !== "" && !shown;
      if (needle) dir.querySelector("details").open = true;
    });
  });

  document.addEventListener("keydown", function (event) {
    var mod = event.ctrlKey || event.metaKey;
    var typing = /^(INPUT|TEXTAREA|SELECT)$/.test(event.target.tagName) || event.target.isContentEditable;
    if (mod && (event.key === "s" || event.key === "S") && workspace()) {
      // Inside the editor CodeMirror's own key map saved already (and prevented the default).
      if (event.defaultPrevented) return;
      // Outside the editor too: save the open file instead of the browser's "save page".
      event.preventDefault();
      var cm = activeEditor();
      if (cm && canEdit()) save(cm);
      return;
    }
    if (mod && (event.key === "p" || event.key === "P") && workspace()) {
      event.preventDefault();
      var filter = document.querySelector("[data-file-filter]");
      if (filter) { filter.focus(); filter.select(); }
      return;
    }
    if (mod && event.key === "1") {
      var fit = document.querySelector("[data-shortcut-fit]");
      if (fit) { event.preventDefault(); fit.click(); }
      return;
    }
    if (event.altKey && (event.key === "1" || event.key === "2")) {
      var tab = document.querySelector('[data-shortcut-alt="' + event.key + '"]');
      if (tab) { event.preventDefault(); tab.click(); }
      return;
    }
    if (event.key === "Enter" && event.target.matches && event.target.matches("[data-file-filter]")) {
      var first = document.querySelector(".tree-file:not([hidden]) .tree-link");
      if (first) { event.preventDefault(); first.click(); }
      return;
    }
    if (typing || mod || event.altKey) return;
    var focus = document.querySelector('[data-shortcut-focus="' + event.key + '"]');
    if (focus) { event.preventDefault(); focus.focus(); return; }
    var link = document.querySelector('[data-shortcut="' + event.key + '"]');
    if (link) { event.preventDefault(); link.click(); }
  });

  window.addEventListener("beforeunload", function (event) {
    if (anyDirty()) {
      event.preventDefault();
      event.returnValue = "";
    }
  });

  document.addEventListener("DOMContentLoaded", function () { initEditors(document); });

  window.FlowAuthoring = { openFile: openFile, activeEditor: activeEditor, save: function () { var cm = activeEditor(); if (cm) save(cm); } };
})();
