// The DAG view: lays out the server's {nodes, edges} graph with dagre and draws it as SVG with pan and zoom.
// Nodes carry their kind (input, node, output, entry, prompty), type (llm, python, prompt), problems and source
// file; clicking a node fires a "dag:open" event with the file and line so the editor can open it.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var FONT = "600 12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
  var SMALL_FONT = "10.5px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
  // Short type marks drawn in a coloured chip (no emoji: headless and minimal systems lack the fonts).
  var TYPE_MARKS = { llm: "AI", python: "Py", prompt: "P", custom_llm: "AI", flex: "Fx", prompty: "Pt" };
  var TYPE_LABELS = { llm: "LLM", python: "Python", prompt: "Prompt", custom_llm: "Custom LLM", flex: "Flex entry", prompty: "Prompty" };
  var MIN_FIT_SCALE = 0.4;
  var measureCanvas = null;

  function textWidth(text, font) {
    if (!measureCanvas) measureCanvas = document.createElement("canvas");
    var context = measureCanvas.getContext("2d");
    context.font = font;
    return context.measureText(text).width;
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (key) {
      node.setAttribute(key, attrs[key]);
    });
    if (parent) parent.appendChild(node);
    return node;
  }

  function subtitle(node) {
    if (node.kind === "input") return "input" + (node.type ? " \u00b7 " + node.type : "") + (node.detail ? " \u00b7 " + node.detail : "");
    if (node.kind === "output") return "output" + (node.type ? " \u00b7 " + node.type : "");
    var parts = [TYPE_LABELS[node.type] || node.type || node.kind];
    if (node.source) parts.push(node.source);
    else if (node.tool) parts.push(node.tool);
    if (node.detail) parts.push(node.detail);
    return parts.join(" \u00b7 ");
  }

  function badges(node) {
    var list = [];
    if (node.aggregation) list.push({ text: "aggregation", cls: "agg" });
    if (node.variants && node.variants.length) list.push({ text: node.variants.length + " variants", cls: "variants" });
    if (node.activate) list.push({ text: "if", cls: "activate", title: "activate " + node.activate });
    return list;
  }

  function truncate(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "\u2026" : text;
  }

  function nodeSize(node) {
    var io = node.kind === "input" || node.kind === "output";
    var title = truncate(node.label, 40);
    var sub = truncate(subtitle(node), 48);
    // Badges are 10px wider than their text plus a 4px gap; the chip and stripe take 39px before the title.
    var badgeWidth = badges(node).reduce(function (sum, b) { return sum + textWidth(b.text, SMALL_FONT) + 16; }, 0);
    var width = Math.max(textWidth(title, FONT) + (io ? 26 : 52) + badgeWidth, textWidth(sub, SMALL_FONT) + (io ? 26 : 30));
    return { width: Math.ceil(Math.min(Math.max(width, io ? 90 : 140), 360)), height: io ? 36 : 46, title: title, sub: sub };
  }

  function edgePath(points) {
    if (points.length < 2) return "";
    var d = "M" + points[0].x + "," + points[0].y;
    if (points.length === 2) return d + " L" + points[1].x + "," + points[1].y;
    // A smooth curve through dagre's bend points: quadratic segments between midpoints.
    for (var i = 1; i < points.length - 1; i++) {
      var mid = { x: (points[i].x + points[i + 1].x) / 2, y: (points[i].y + points[i + 1].y) / 2 };
      if (i === points.length - 2) mid = points[i + 1];
      d += " Q" + points[i].x + "," + points[i].y + " " + mid.x + "," + mid.y;
    }
    return d;
  }

  function layout(graph, direction) {
    var g = new dagre.graphlib.Graph({ multigraph: true });
    g.setGraph({ rankdir: direction || "TB", nodesep: 22, ranksep: 42, edgesep: 12, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(function () { return {}; });
    graph.nodes.forEach(function (node) {
      var size = nodeSize(node);
      g.setNode(node.id, { width: size.width, height: size.height, data: node, title: size.title, sub: size.sub });
    });
    graph.edges.forEach(function (edge, index) {
      if (g.hasNode(edge.source) && g.hasNode(edge.target)) g.setEdge(edge.source, edge.target, { data: edge }, "e" + index);
    });
    dagre.layout(g);
    return g;
  }

  function render(container, graph, options) {
    options = options || {};
    container.innerHTML = "";
    if (!graph || !graph.nodes || !graph.nodes.length) {
      var empty = document.createElement("div");
      empty.className = "dag-empty";
      empty.textContent = options.emptyText || "Nothing to draw: the flow has no nodes yet.";
      container.appendChild(empty);
      return null;
    }
    var g = layout(graph, options.direction);
    if (!options.fixedDirection) {
      // A wide graph in a tall pane (or the reverse) reads better turned: keep the layout that fits larger.
      var box = container.getBoundingClientRect();
      var fitScale = function (layoutGraph) {
        var gs = layoutGraph.graph();
        return Math.min((box.width || 320) / gs.width, (box.height || 320) / gs.height);
      };
      if (fitScale(g) < 0.75) {
        var turned = layout(graph, options.direction === "LR" ? "TB" : "LR");
        if (fitScale(turned) > fitScale(g) * 1.15) g = turned;
      }
    }
    var size = g.graph();
    var svg = el("svg", { class: "dag-svg dag-" + (graph.kind || "dag"), role: "img", "aria-label": "Flow graph with " + graph.nodes.length + " items" });
    var defs = el("defs", {}, svg);
    ["data", "activate", "added", "removed"].forEach(function (kind) {
      var marker = el("marker", { id: "dag-arrow-" + kind + "-" + (options.idSuffix || ""), viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, defs);
      el("path", { d: "M0,0 L10,5 L0,10 z", class: "dag-arrow dag-arrow-" + kind }, marker);
    });
    var viewport = el("g", { class: "dag-viewport" }, svg);

    g.edges().forEach(function (key) {
      var edge = g.edge(key);
      var data = edge.data;
      var cls = "dag-edge dag-edge-" + data.kind + (data.diff ? " dag-diff-" + data.diff : "");
      var markerKind = data.diff === "added" || data.diff === "removed" ? data.diff : data.kind;
      var path = el("path", { d: edgePath(edge.points), class: cls, "marker-end": "url(#dag-arrow-" + markerKind + "-" + (options.idSuffix || "") + ")" }, viewport);
      if (data.label) el("title", {}, path).textContent = key.v.split(":")[1] + " \u2192 " + key.w.split(":")[1] + (data.label ? " (" + data.label + ")" : "");
    });

    g.nodes().forEach(function (id) {
      var box = g.node(id);
      var node = box.data;
      var problems = node.problems || [];
      var classes = ["dag-node", "dag-kind-" + node.kind];
      if (node.type) classes.push("dag-type-" + node.type);
      if (problems.length) classes.push("dag-has-problems");
      if (node.aggregation) classes.push("dag-aggregation");
      if (node.diff) classes.push("dag-diff-" + node.diff);
      if (node.file && options.clickable !== false) classes.push("dag-clickable");
      var group = el("g", {
        class: classes.join(" "),
        transform: "translate(" + (box.x - box.width / 2) + "," + (box.y - box.height / 2) + ")",
        "data-id": node.id,
        "data-name": node.label,
        tabindex: node.file && options.clickable !== false ? "0" : "-1",
      }, viewport);
      var io = node.kind === "input" || node.kind === "output";
      el("rect", { class: "dag-box", width: box.width, height: box.height, rx: io ? box.height / 2 : 7 }, group);
      if (!io) el("rect", { class: "dag-stripe", width: 4, height: box.height - 12, x: 5, y: 6, rx: 2 }, group);
      var x = io ? 12 : 16;
      if (!io) {
        var chip = el("g", { class: "dag-chip", transform: "translate(" + x + ",8)" }, group);
        el("rect", { width: 18, height: 15, rx: 3 }, chip);
        var mark = el("text", { x: 9, y: 11, "text-anchor": "middle" }, chip);
        mark.textContent = TYPE_MARKS[node.type] || "?";
        x += 23;
      }
      var title = el("text", { class: "dag-title", x: x, y: io ? 15 : 19 }, group);
      title.textContent = box.title;
      var sub = el("text", { class: "dag-sub", x: io ? 12 : 16, y: io ? 28 : 36 }, group);
      sub.textContent = box.sub;
      var bx = box.width - 6;
      badges(node).reverse().forEach(function (badge) {
        var w = textWidth(badge.text, SMALL_FONT) + 10;
        bx -= w;
        var b = el("g", { class: "dag-badge dag-badge-" + badge.cls, transform: "translate(" + bx + ",6)" }, group);
        el("rect", { width: w, height: 15, rx: 7.5 }, b);
        var t = el("text", { x: 5, y: 11 }, b);
        t.textContent = badge.text;
        if (badge.title) el("title", {}, b).textContent = badge.title;
        bx -= 4;
      });
      if (problems.length) {
        var p = el("g", { class: "dag-problem-badge", transform: "translate(" + (box.width - 8) + ",-6)" }, group);
        el("circle", { r: 8, cx: 0, cy: 0 }, p);
        var pt = el("text", { x: 0, y: 3.5, "text-anchor": "middle" }, p);
        pt.textContent = String(problems.length);
      }
      var tip = [node.label + " (" + subtitle(node) + ")"];
      if (node.activate) tip.push("activate " + node.activate);
      if (node.variants && node.variants.length) tip.push("variants: " + node.variants.join(", "));
      if (node.inputs) Object.keys(node.inputs).forEach(function (k) { tip.push("  " + k + ": " + node.inputs[k]); });
      problems.forEach(function (msg) { tip.push("\u26a0 " + msg); });
      if (node.diff && node.diff !== "same") tip.push("(" + node.diff + ")");
      el("title", {}, group).textContent = tip.join("\n");
    });

    container.appendChild(svg);
    var state = { scale: 1, x: 0, y: 0, width: size.width, height: size.height, svg: svg, viewport: viewport, container: container };
    attachPanZoom(state);
    fit(state);
    container._dag = state;

    if (options.clickable !== false) {
      var open = function (target) {
        var group = target.closest(".dag-node.dag-clickable");
        if (!group) return;
        var node = g.node(group.getAttribute("data-id")).data;
        container.dispatchEvent(new CustomEvent("dag:open", { bubbles: true, detail: { id: node.id, file: node.file, line: node.line || node.yaml_line || null, name: node.label } }));
      };
      svg.addEventListener("click", function (event) {
        if (state.dragged) return;
        open(event.target);
      });
      svg.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          open(event.target);
        }
      });
    }
    return state;
  }

  function apply(state) {
    state.viewport.setAttribute("transform", "translate(" + state.x + "," + state.y + ") scale(" + state.scale + ")");
  }

  function fit(state) {
    var rect = state.container.getBoundingClientRect();
    var width = rect.width || 320;
    var height = rect.height || 320;
    state.svg.setAttribute("width", "100%");
    state.svg.setAttribute("height", "100%");
    // Below this scale labels cannot be read: show the start of the graph at a readable size and let the
    // user pan (drag) and zoom (wheel, +/-) from there.
    var scale = Math.max(Math.min(width / state.width, height / state.height, 1.25), MIN_FIT_SCALE);
    state.scale = scale;
    state.x = state.width * scale <= width ? (width - state.width * scale) / 2 : 8;
    state.y = state.height * scale <= height ? (height - state.height * scale) / 2 : 8;
    apply(state);
  }

  function zoom(state, factor, cx, cy) {
    var next = Math.min(Math.max(state.scale * factor, 0.05), 4);
    var rect = state.container.getBoundingClientRect();
    if (cx === undefined) { cx = rect.width / 2; cy = rect.height / 2; }
    state.x = cx - (cx - state.x) * (next / state.scale);
    state.y = cy - (cy - state.y) * (next / state.scale);
    state.scale = next;
    apply(state);
  }

  function attachPanZoom(state) {
    var svg = state.svg;
    var start = null;
    svg.addEventListener("wheel", function (event) {
      event.preventDefault();
      var rect = svg.getBoundingClientRect();
      zoom(state, event.deltaY < 0 ? 1.12 : 1 / 1.12, event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    svg.addEventListener("pointerdown", function (event) {
      if (event.button !== 0) return;
      start = { x: event.clientX, y: event.clientY, ox: state.x, oy: state.y };
      state.dragged = false;
    });
    window.addEventListener("pointermove", function (event) {
      if (!start) return;
      var dx = event.clientX - start.x;
      var dy = event.clientY - start.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) state.dragged = true;
      if (!state.dragged) return;
      state.x = start.ox + dx;
      state.y = start.oy + dy;
      apply(state);
    });
    window.addEventListener("pointerup", function () {
      start = null;
      setTimeout(function () { state.dragged = false; }, 0);
    });
  }

  function readGraph(id) {
    var script = document.getElementById(id);
    if (!script) return null;
    try {
      return JSON.parse(script.textContent);
    } catch (e) {
      return null;
    }
  }

  // Draw every [data-dag] container inside `root`; the attribute names the <script type="application/json"> id.
  function renderAll(root) {
    root = root || document;
    var containers = Array.prototype.slice.call(root.querySelectorAll ? root.querySelectorAll("[data-dag]") : []);
    if (root.matches && root.matches("[data-dag]")) containers.push(root);
    containers.forEach(function (container) {
      var script = document.getElementById(container.getAttribute("data-dag"));
      // htmx settles several swaps at once: draw each graph once per content.
      if (!script || (container._dag && container._dagSource === script.textContent && container.isConnected && container.querySelector("svg"))) return;
      container._dagSource = script.textContent;
      var graph = readGraph(container.getAttribute("data-dag"));
      render(container, graph, {
        direction: container.getAttribute("data-direction") || "TB",
        clickable: container.getAttribute("data-clickable") !== "false",
        idSuffix: container.getAttribute("data-dag"),
        emptyText: container.getAttribute("data-empty"),
      });
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-dag-action]");
    if (!button) return;
    var container = document.getElementById(button.getAttribute("data-dag-target"));
    if (!container || !container._dag) return;
    var action = button.getAttribute("data-dag-action");
    if (action === "fit") fit(container._dag);
    else if (action === "in") zoom(container._dag, 1.25);
    else if (action === "out") zoom(container._dag, 0.8);
  });

  document.addEventListener("DOMContentLoaded", function () { renderAll(document); });
  // Out-of-band swaps (the side pane after a save) settle apart from the request's target: look everywhere;
  // graphs already drawn from the same JSON are skipped.
  document.addEventListener("htmx:afterSettle", function () { renderAll(document); });
  document.addEventListener("htmx:oobAfterSwap", function () { renderAll(document); });
  window.addEventListener("resize", function () {
    document.querySelectorAll("[data-dag]").forEach(function (container) {
      if (container._dag) fit(container._dag);
    });
  });

  window.FlowDag = { render: render, renderAll: renderAll, fit: fit, layout: layout };
})();
