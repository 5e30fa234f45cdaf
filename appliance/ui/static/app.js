// The UI's only script: the glue between htmx and the pages. Everything here is an
// enhancement; every page reads and every form works without it.
"use strict";

// A request htmx makes carries the session's CSRF token (forms carry it as a field).
document.addEventListener("htmx:configRequest", function (event) {
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (meta) {
    event.detail.headers["X-CSRF-Token"] = meta.content;
  }
});

// Polls rest while the page is not seen.
document.addEventListener("htmx:beforeRequest", function (event) {
  var element = event.detail.elt;
  if (document.hidden && element && element.hasAttribute("data-poll")) {
    event.preventDefault();
  }
});

// A poll's answer that is the same as the last one changes nothing on the page: no swap,
// so focus, selection and an open <details> stay where they are.
var lastAnswers = {};
document.addEventListener("htmx:beforeSwap", function (event) {
  var target = event.detail.target;
  if (!target || !target.id || !target.hasAttribute("data-poll")) {
    return;
  }
  var answer = event.detail.serverResponse;
  if (event.detail.xhr.status === 200 && lastAnswers[target.id] === answer) {
    event.detail.shouldSwap = false;
  }
  lastAnswers[target.id] = answer;
});

// The session ended (the daemon restarted, or it idled out): to the login page.
document.addEventListener("htmx:responseError", function (event) {
  if (event.detail.xhr.status === 401) {
    window.location.assign("/ui/login?next=" + encodeURIComponent(window.location.pathname));
  }
});
