/* The compare page's charts (Chart.js, data from json_script) and the run list's selection (Compare/Archive). */
(function () {
  "use strict";

  var PALETTE = ["#2f5bea", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0c8599", "#c2255c", "#5c940d", "#1864ab", "#862e9c"];
  var charts = [];
  var drawnFrom = null;

  function color(index, alpha) {
    var hex = PALETTE[index % PALETTE.length];
    if (alpha === undefined) return hex;
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  function textColor() {
    return getComputedStyle(document.documentElement).getPropertyValue("--text-muted").trim() || "#5d6875";
  }

  function drawCharts() {
    var source = document.getElementById("compare-chart-data");
    // Other swaps (rows, counts) settle too: draw only when the chart data itself was replaced.
    if (!source || source === drawnFrom || typeof window.Chart === "undefined") return;
    drawnFrom = source;
    var data = JSON.parse(source.textContent);
    charts.forEach(function (chart) { chart.destroy(); });
    charts = [];
    window.Chart.defaults.color = textColor();
    var bars = document.getElementById("chart-bars");
    if (bars) {
      charts.push(new window.Chart(bars, {
        type: "bar",
        data: {
          labels: data.bars.labels,
          datasets: data.bars.datasets.map(function (set, i) {
            return { label: set.label, data: set.data, backgroundColor: color(i, 0.75) };
          })
        },
        options: { responsive: true, animation: false }
      }));
    }
    var histogram = document.getElementById("chart-histogram");
    if (histogram) {
      charts.push(new window.Chart(histogram, {
        type: "bar",
        data: {
          labels: data.histogram.labels,
          datasets: data.histogram.datasets.map(function (set, i) {
            return { label: set.label, data: set.data, backgroundColor: color(i, 0.55), borderColor: color(i), borderWidth: 1 };
          })
        },
        options: { responsive: true, animation: false, scales: { x: { title: { display: true, text: data.histogram.column } }, y: { title: { display: true, text: "lines" } } } }
      }));
    }
    var scatter = document.getElementById("chart-scatter");
    if (scatter) {
      var points = data.scatter.points;
      var values = points.reduce(function (all, p) { return all.concat([p.x, p.y]); }, []);
      var low = Math.min.apply(null, values), high = Math.max.apply(null, values);
      charts.push(new window.Chart(scatter, {
        type: "scatter",
        data: {
          datasets: [
            { label: "lines", data: points, backgroundColor: color(0, 0.5), pointRadius: 3 },
            { label: "x = y", type: "line", data: [{ x: low, y: low }, { x: high, y: high }], borderColor: color(1, 0.6), borderDash: [4, 4], pointRadius: 0 }
          ]
        },
        options: {
          responsive: true,
          animation: false,
          scales: { x: { title: { display: true, text: data.scatter.x } }, y: { title: { display: true, text: data.scatter.y } } },
          plugins: {
            tooltip: {
              callbacks: {
                label: function (item) {
                  var p = item.raw;
                  return p.line === undefined ? "" : "line " + p.line + ": " + p.x + " → " + p.y;
                }
              }
            }
          }
        }
      }));
    }
  }

  /* --- run list: keep the ticked runs across row refreshes, and drive the Compare / Archive buttons --- */

  var ticked = new Set();

  function selectionBar() {
    return document.querySelector("[data-run-selection]");
  }

  function syncSelection() {
    var bar = selectionBar();
    if (!bar) return;
    document.querySelectorAll("input[data-select-run]").forEach(function (box) {
      box.checked = ticked.has(box.value);
    });
    var count = ticked.size;
    var counter = bar.querySelector("[data-selected-count]");
    if (counter) counter.textContent = count + " selected";
    var compare = bar.querySelector("[data-compare-selected]");
    if (compare) {
      compare.disabled = count < 2 || count > 10;
      compare.title = count > 10 ? "Compare at most 10 runs" : count < 2 ? "Tick two to ten runs" : "";
    }
    bar.querySelectorAll("[data-archive-selected]").forEach(function (button) { button.disabled = count === 0; });
    var field = bar.querySelector("input[name=runs]");
    if (field) field.value = Array.from(ticked).join(",");
  }

  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!(box instanceof HTMLInputElement) || !box.matches("input[data-select-run], input[data-select-all]")) return;
    if (box.matches("[data-select-all]")) {
      document.querySelectorAll("input[data-select-run]").forEach(function (other) {
        if (box.checked) ticked.add(other.value); else ticked.delete(other.value);
      });
    } else if (box.checked) {
      ticked.add(box.value);
    } else {
      ticked.delete(box.value);
    }
    syncSelection();
  });

  // The archive buttons post the ticked runs (not the whole filter form).
  document.addEventListener("htmx:configRequest", function (event) {
    var source = event.detail.elt;
    if (source && source.matches && source.matches("[data-archive-selected]")) {
      event.detail.parameters.runs = Array.from(ticked);
    }
  });

  /* Links outside the swapped rows (exports, "Make baseline") follow the state htmx pushed into the URL. */
  function refreshStateLinks() {
    var params = new URLSearchParams(window.location.search);
    if (!params.get("runs")) return;
    params.delete("part");
    document.querySelectorAll("a[data-export]").forEach(function (link) {
      link.href = link.pathname + "?" + params.toString();
    });
    document.querySelectorAll("a[data-make-baseline]").forEach(function (link) {
      var own = new URLSearchParams(params);
      own.set("baseline", link.dataset.makeBaseline);
      ["page", "x", "y"].forEach(function (key) { own.delete(key); });
      link.href = "?" + own.toString();
    });
  }

  document.addEventListener("htmx:pushedIntoHistory", refreshStateLinks);

  function init() {
    document.querySelectorAll("input[data-select-run]:checked").forEach(function (box) { ticked.add(box.value); });
    syncSelection();
    drawCharts();
  }

  document.addEventListener("DOMContentLoaded", init);
  document.addEventListener("htmx:afterSettle", function () {
    syncSelection();
    drawCharts();
  });
})();
