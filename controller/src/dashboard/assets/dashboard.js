// Fleet dashboard: keeps a page's live region current.
//
// The server renders every page; a page with a live region (#live) says where a fresh
// copy of it comes from (data-src) and which events change it (data-events, and
// data-rollout to only follow one rollout). On such an event the region is fetched
// again (changes arriving together cause one fetch), and each time the event stream
// opens (the first time, and after it was lost) once more, so nothing missed stays
// stale.
// Times shown as "5s ago" or an uptime tick every second.
(function () {
  "use strict";

  function ago(ms) {
    var s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-since]").forEach(function (el) {
      el.textContent = ago(now - Number(el.dataset.since)) + " ago";
    });
    document.querySelectorAll("[data-uptime]").forEach(function (el) {
      el.textContent = ago(now - Number(el.dataset.uptime));
    });
  }
  setInterval(tick, 1000);

  var status = document.getElementById("live-status");
  function setStatus(state, text) {
    if (!status) return;
    status.dataset.state = state;
    status.textContent = text;
  }

  var live = document.getElementById("live");
  if (!live) {
    setStatus("idle", "");
    return;
  }
  var events = (live.dataset.events || "").split(",").filter(Boolean);
  var only = live.dataset.rollout || "";
  var busy = false, again = false, timer = null, refreshes = 0;
  // How long the last refresh took (fetch and swap). The next one waits at least nine
  // times as long, so that a page spends at most about a tenth of its time refreshing,
  // and costs the controller as little: at 100,000 nodes in a rollout a refresh takes
  // ~140 ms, and one page refreshing as fast as the events came (every ~0.4 s) added
  // 20-40 % to the controller's CPU. A small fleet's page still refreshes within
  // ~0.1 s of its events.
  var cost = 0;

  function schedule() {
    if (timer) return;
    timer = setTimeout(function () { timer = null; refresh(); }, Math.max(100, 9 * cost));
  }

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    var started = Date.now();
    fetch(live.dataset.src, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/login") >= 0) {
          location.href = r.url;
          return null;
        }
        return r.text();
      })
      .then(function (html) {
        if (html === null) return;
        live.innerHTML = html;
        refreshes += 1;
        live.dataset.refreshes = String(refreshes);
        tick();
        cost = Date.now() - started;
      })
      .catch(function () { again = true; })
      .finally(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
  }

  // Catch up whenever the stream (re)opens: changes made between this page's render
  // and the first open, or while the stream was lost, were never heard of.
  var source = null;
  function connect() {
    // Changes gathered over 250 ms by the server: a page only needs to know it is out
    // of date, and a large rollout changes thousands of nodes a second.
    source = new EventSource("/api/events?coalesce_ms=250");
    source.onopen = function () {
      setStatus("live", "live");
      refresh();
    };
    source.onerror = function () {
      setStatus("reconnecting", "reconnecting…");
      // The browser retries by itself unless the server answered with an error.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(connect, 2000);
      }
    };
    events.forEach(function (name) {
      source.addEventListener(name, function (e) {
        if (name === "rollout" && only && e.data !== only) return;
        schedule();
      });
    });
    source.addEventListener("resync", schedule);
  }
  connect();
  // Pages that show what changes without an event (requests in flight) also
  // refresh on a timer.
  var every = Number(live.dataset.every || 0);
  if (every > 0) setInterval(schedule, every);
})();
