// BitMesh captive portal: status, bundles, Lightning invoice, restore. Same-origin
// calls to the gateway's API only; no external resources (the phone has no internet).
"use strict";
(function () {
  var T = JSON.parse(document.getElementById("strings").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var TOKEN_KEY = "bitmesh.token";
  var last = null; // {used, at} of the previous status sample, for the rate
  var paying = null; // payment hash being watched
  var invoiceTimer = null; // the next check of the watched invoice
  var credited = null; // bytes_credited of the previous status sample
  var restored = false; // a purchase was restored on this page
  var lightning = false; // the gateway sells bundles (purchase codes exist only then)
  var device = null; // the latest status answer

  function t(key, vars) {
    return (T[key] || key).replace(/\{(\w+)\}/g, function (_, k) { return vars && k in vars ? vars[k] : ""; });
  }
  function size(bytes) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0, v = bytes;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)) + " " + u[i];
  }
  function sats(msat) {
    var s = msat / 1000;
    return s >= 100 ? Math.round(s).toLocaleString() : String(Math.round(s * 1000) / 1000);
  }
  function duration(secs) {
    if (secs >= 86400) return Math.round(secs / 86400) + " d";
    if (secs >= 3600) return Math.round(secs / 3600) + " h";
    return Math.max(1, Math.round(secs / 60)) + " min";
  }
  function show(id, on) { $(id).hidden = !on; }
  function api(method, path, body) {
    var opts = { method: method, headers: {}, cache: "no-store" };
    if (body) { opts.headers["content-type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch(path, opts).then(function (r) {
      return r.text().then(function (text) {
        var json = null;
        try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
        if (!r.ok) { var err = new Error((json && json.message) || ("HTTP " + r.status)); err.code = json && json.code; throw err; }
        return json;
      });
    });
  }
  function errorText(e) {
    if (e.code === "unknown_token") return t("err_unknown_token");
    if (e.code === "token_expired") return t("err_token_expired");
    return t("err_generic", { message: e.message });
  }

  // --- status: the device's combined credit, every second ---
  function renderStatus(d) {
    var now = Date.now();
    var rate = 0;
    if (last && now > last.at && d.bytes_used >= last.used) rate = (d.bytes_used - last.used) * 1000 / (now - last.at);
    last = { used: d.bytes_used, at: now };
    // New credit while an invoice is shown: ask about the invoice now rather than at
    // its next check, so "paid" and "connected" appear together.
    if (paying && credited !== null && d.bytes_credited > credited) watchInvoice(paying, 0);
    credited = d.bytes_credited;
    var line = $("status-line"), warn = $("warn");
    var hasCredit = d.bytes_credited > 0;
    document.body.dataset.state = d.captive ? (hasCredit ? "used-up" : "offline") : "connected";
    show("meter", hasCredit);
    if (hasCredit) {
      $("remaining").textContent = size(d.bytes_remaining);
      $("used").textContent = size(d.bytes_used);
      // The exact figures, for tools and tests reading the page.
      $("remaining").dataset.bytes = d.bytes_remaining;
      $("used").dataset.bytes = d.bytes_used;
      $("rate").textContent = size(Math.round(rate)) + "/s";
      show("valid-row", d.seconds_remaining != null);
      if (d.seconds_remaining != null) $("valid").textContent = duration(d.seconds_remaining);
    }
    if (!d.captive) {
      line.textContent = t("status_connected");
      // A tenth of the purchase left, or 1 MiB but never more than a quarter of it
      // (a small bundle is not "almost used up" the moment it is bought).
      var low = d.bytes_remaining < Math.max(d.bytes_credited / 10, Math.min(1048576, d.bytes_credited / 4));
      warn.textContent = low ? t("status_low") : "";
      show("warn", low);
    } else {
      line.textContent = hasCredit ? t("status_used_up") : t("status_offline");
      show("warn", false);
    }
    show("buy-more", hasCredit);
    device = d;
    showRestore();
  }
  // The restore form, for a phone without credit, once the terms say codes exist.
  // Called by both answers: whichever of terms and status arrives last shows it, so
  // it appears with the status line rather than a poll later. Kept in view after a
  // restore on this page, so its confirmation stays readable.
  function showRestore() {
    var hasCredit = device && device.bytes_credited > 0;
    show("restore", lightning && device !== null && (!hasCredit || device.captive || restored));
  }
  function pollStatus() {
    api("GET", "/v1/device").then(renderStatus, function (e) {
      $("status-line").textContent = errorText(e);
    }).then(function () { setTimeout(pollStatus, 1000); });
  }

  // --- terms and bundles ---
  function renderTerms(terms) {
    var msat = terms.price_msat_per_mib;
    $("price").textContent = t("price_line", { mib: sats(msat), gb: sats(msat * 1e9 / 1048576) });
    $("laptop-cmd").textContent += " --max-price " + Math.ceil(msat / 1000);
    var ln = terms.lightning;
    if (!ln || !ln.bundles || !ln.bundles.length) { show("no-lightning", true); show("restore", false); return; }
    lightning = true;
    var list = $("bundle-list");
    list.textContent = "";
    ln.bundles.forEach(function (b) {
      var btn = document.createElement("button");
      btn.type = "button";
      btn.className = "secondary";
      btn.dataset.bundle = b.name;
      btn.setAttribute("aria-pressed", "false");
      btn.textContent = t("bundle_button", { name: b.name, size: size(b.bytes), sats: sats(b.price_msat) });
      btn.addEventListener("click", function () { buy(b, btn); });
      list.appendChild(btn);
    });
    show("bundles", true);
    showRestore();
  }

  // --- invoice ---
  function buy(bundle, btn) {
    Array.prototype.forEach.call($("bundle-list").children, function (b) { b.setAttribute("aria-pressed", String(b === btn)); });
    show("buy-error", false);
    var token = localStorage.getItem(TOKEN_KEY);
    api("POST", "/v1/invoices", { bundle: bundle.name, token: token || null }).then(function (inv) {
      if (inv.token) { localStorage.setItem(TOKEN_KEY, inv.token); renderToken(); }
      var uri = "lightning:" + inv.bolt11;
      // Upper case: the QR code's alphanumeric mode, a smaller code for wallets to scan.
      $("qr").src = "/portal/qr.svg?d=" + encodeURIComponent(uri.toUpperCase());
      $("qr").alt = t("invoice_qr_alt", { size: size(inv.bytes) });
      $("open-wallet").href = uri;
      $("bolt11").textContent = inv.bolt11;
      $("pay-state").textContent = t("waiting");
      show("invoice-pay", true);
      show("invoice", true);
      // On a phone the invoice is below the fold: bring it into view.
      if ($("invoice").scrollIntoView) $("invoice").scrollIntoView({ block: "start" });
      paying = inv.payment_hash;
      watchInvoice(inv.payment_hash, 0);
      listen();
    }, function (e) {
      // A stored code the gateway does not know (another gateway, a reset): forget it and buy without.
      if (e.code === "unknown_token" && token) { localStorage.removeItem(TOKEN_KEY); renderToken(); buy(bundle, btn); return; }
      $("buy-error").textContent = errorText(e);
      show("buy-error", true);
    });
  }
  // The device's event stream (GET /v1/device/events), opened once an invoice is
  // shown: a payment shows the moment it is credited, not at the next poll. On any
  // error (or its end) it is closed, not reconnected (no loop on the garden budget);
  // the next invoice opens it again, and polling carries on either way.
  var stream = null;
  function listen() {
    if (stream || !window.EventSource) return;
    stream = new EventSource("/v1/device/events");
    stream.addEventListener("credit", function (ev) {
      try { renderStatus(JSON.parse(ev.data)); } catch (e) { /* the poll renders it */ }
    });
    stream.addEventListener("invoice_paid", function () { if (paying) watchInvoice(paying, 0); });
    stream.onerror = function () { stream.close(); stream = null; };
  }

  // Check the invoice `hash` after `delay` ms (one check pending at a time).
  function watchInvoice(hash, delay) {
    clearTimeout(invoiceTimer);
    invoiceTimer = setTimeout(function () { checkInvoice(hash); }, delay);
  }
  function checkInvoice(hash) {
    if (paying !== hash) return;
    api("GET", "/v1/invoices/" + hash).then(function (s) {
      if (paying !== hash) return;
      if (s.state === "paid") {
        $("pay-state").textContent = t("paid");
        // A paid invoice is not to be scanned again.
        show("invoice-pay", false);
        paying = null;
        // Back to the top: the connection's status and figures.
        if ($("status").scrollIntoView) $("status").scrollIntoView({ block: "start" });
        api("GET", "/v1/device").then(renderStatus);
        return;
      }
      if (s.state === "expired") { $("pay-state").textContent = t("expired"); show("invoice-pay", false); paying = null; return; }
      watchInvoice(hash, 500);
    }, function () { watchInvoice(hash, 1000); });
  }
  $("copy").addEventListener("click", function () {
    var text = $("bolt11").textContent;
    var done = function () { $("copy").textContent = t("copied"); };
    if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done); return; }
    var area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); done(); } catch (e) { /* the code is shown to copy by hand */ }
    document.body.removeChild(area);
  });

  // --- purchase token and restore ---
  function renderToken() {
    var token = localStorage.getItem(TOKEN_KEY);
    show("token", !!token);
    if (token) { $("token-code").textContent = token; if (!$("restore-code").value) $("restore-code").value = token; }
  }
  $("restore-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var token = $("restore-code").value.trim().toUpperCase();
    $("restore-result").textContent = "";
    api("POST", "/v1/restore", { token: token }).then(function (r) {
      localStorage.setItem(TOKEN_KEY, token);
      restored = true;
      renderToken();
      $("restore-result").textContent = t("restored", { size: size(r.bytes_remaining) });
      api("GET", "/v1/device").then(renderStatus);
    }, function (e) { $("restore-result").textContent = errorText(e); });
  });

  renderToken();
  api("GET", "/v1/terms").then(renderTerms, function (e) { $("price").textContent = errorText(e); });
  pollStatus();
})();
