// dealbridge dashboard: progressive enhancement only; every page works
// without it. Served from 'self' under a CSP without 'unsafe-inline'.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var ta = document.getElementById("payload-input");
    var btn = document.getElementById("format-json");
    var err = document.getElementById("payload-error");
    if (!ta || !btn || !err) return;
    // A syntax check while typing; the server validates the schema and
    // names the offending field.
    var check = function () {
      try {
        JSON.parse(ta.value);
        ta.classList.remove("invalid");
        if (err.dataset.client === "1") { err.textContent = ""; err.dataset.client = ""; }
        return true;
      } catch (e) {
        ta.classList.add("invalid");
        err.textContent = "Not valid JSON: " + e.message;
        err.dataset.client = "1";
        return false;
      }
    };
    ta.addEventListener("input", check);
    btn.addEventListener("click", function () {
      if (check()) ta.value = JSON.stringify(JSON.parse(ta.value), null, 2);
    });
  });
})();
