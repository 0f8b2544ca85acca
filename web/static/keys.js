// Keyboard shortcuts on the review page: c = confirm, r = reject, n/j = next, k = previous.
// Elements opt in with data-key; nothing happens while typing in a field.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    var key = event.key === "j" ? "n" : event.key;
    var element = document.querySelector('[data-key="' + key + '"]');
    if (!element) return;
    event.preventDefault();
    element.click();
  });
})();
