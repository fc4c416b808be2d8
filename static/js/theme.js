// Applies the remembered theme before the page paints; without a choice the CSS follows prefers-color-scheme.
(function () {
  "use strict";
  var KEY = "flowstudio-theme";
  var root = document.documentElement;

  function stored() {
    try {
      var value = window.localStorage.getItem(KEY);
      return value === "light" || value === "dark" ? value : null;
    } catch (e) {
      return null; // storage disabled: follow the system
    }
  }

  function effective() {
    var chosen = stored();
    if (chosen) return chosen;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  function apply(theme) {
    if (theme) root.setAttribute("data-theme", theme);
    else root.removeAttribute("data-theme");
  }

  apply(stored());

  window.flowStudioTheme = {
    effective: effective,
    toggle: function () {
      var next = effective() === "dark" ? "light" : "dark";
      try {
        window.localStorage.setItem(KEY, next);
      } catch (e) {
        // storage disabled: the choice lasts for this page only
      }
      apply(next);
      return next;
    },
  };
})();
