// fastworker dashboard: polls server-rendered fragments and sends write requests. Values from the server arrive
// escaped inside those fragments; anything this script writes itself goes through textContent, never innerHTML.
(() => {
  "use strict";
  const TOKEN_KEY = "fastworker-dashboard-token";
  const body = document.body;
  const interval = Number(body.dataset.intervalMs) || 2000;
  const writable = body.dataset.writable === "true";
  const $ = (selector) => document.querySelector(selector);
  const picked = new Set(); // "stream\nid" of the selected dead letters, kept across refreshes
  let deadTotal = null;
  let filters = new URLSearchParams();

  // A token in the URL's fragment (never sent to the server, never logged): keep it for this tab, then drop it.
  function tokenFromHash() {
    if (!location.hash.startsWith("#token=")) return;
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(location.hash.slice("#token=".length)));
    history.replaceState(null, "", location.pathname + location.search);
    showLock();
  }
  const token = () => (writable ? sessionStorage.getItem(TOKEN_KEY) : null);

  function notice(message, isError) {
    const element = $("#notice");
    element.textContent = message;
    element.classList.toggle("error", Boolean(isError));
    element.hidden = !message;
  }

  async function fragment(url) {
    const response = await fetch(url, { headers: { Accept: "text/html" }, cache: "no-store" });
    const text = await response.text();
    if (!response.ok) throw new Error(text || `HTTP ${response.status}`);
    return text;
  }

  async function write(path, payload) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token() || ""}` },
      body: JSON.stringify(payload),
      cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  function confirmAction(message) {
    return new Promise((resolve) => {
      const dialog = $("#confirm");
      $("#confirm-text").textContent = message;
      dialog.returnValue = "";
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  // -- token ---------------------------------------------------------------------------------------------------

  function showLock() {
    if (!writable) return;
    const unlocked = Boolean(token());
    $("#unlock").hidden = unlocked;
    $("#unlocked").hidden = !unlocked;
    updateButtons();
  }

  async function unlock(event) {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value);
    $("#token").value = "";
    try {
      await write("api/check-token", {});
      notice("");
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      notice(`not unlocked: ${error.message}`, true);
    }
    showLock();
  }

  // -- live panels ---------------------------------------------------------------------------------------------

  async function poll() {
    try {
      $("#live").innerHTML = await fragment("fragments/live");
      $("#status").textContent = "live";
      $("#status").classList.remove("offline");
      const summary = $("#live .summary");
      const total = summary ? summary.dataset.deadTotal : null;
      if (deadTotal !== null && total !== deadTotal) await refreshLetters();
      deadTotal = total;
    } catch (error) {
      $("#status").textContent = "offline";
      $("#status").classList.add("offline");
    } finally {
      setTimeout(poll, interval);
    }
  }

  // -- dead letters --------------------------------------------------------------------------------------------

  const key = (element) => `${element.dataset.stream}\n${element.dataset.id}`;

  function selection() {
    return [...picked].map((item) => {
      const [stream, id] = item.split("\n");
      return { stream, id };
    });
  }

  function updateButtons() {
    const unlocked = writable && Boolean(token());
    for (const button of document.querySelectorAll("button.write")) {
      const needsSelection = button.id === "requeue-selected" || button.id === "purge-selected";
      button.disabled = !unlocked || (needsSelection && picked.size === 0);
    }
  }

  async function refreshLetters() {
    const html = await fragment(`fragments/dead-letters?${filters}`);
    $("#dead-letters").innerHTML = html;
    const present = new Set();
    for (const box of document.querySelectorAll("#dead-letters .pick")) {
      present.add(key(box));
      box.checked = picked.has(key(box));
    }
    for (const item of [...picked]) if (!present.has(item)) picked.delete(item);
    updateButtons();
  }

  function readFilters(event) {
    event.preventDefault();
    const params = new URLSearchParams();
    const stream = $("#dl-stream").value;
    const errorClass = $("#dl-error-class").value.trim();
    if (stream) params.set("stream", stream);
    if (errorClass) params.set("error_class", errorClass);
    for (const [id, name] of [["#dl-since", "since_ms"], ["#dl-until", "until_ms"]]) {
      const value = $(id).value;
      if (value) params.set(name, String(new Date(value).getTime()));
    }
    filters = params;
    refreshLetters().catch((error) => notice(error.message, true));
  }

  async function openLetter(stream, id) {
    const params = new URLSearchParams({ stream, id });
    $("#letter").innerHTML = await fragment(`fragments/dead-letter?${params}`);
    updateButtons();
    $("#letter").scrollIntoView({ block: "nearest" });
  }

  async function act(action, letters) {
    const verb = action === "requeue" ? "Requeue" : "Purge (delete for good)";
    const where = letters.length === 1 ? `${letters[0].id} of ${letters[0].stream}` : `${letters.length} dead letters`;
    if (!(await confirmAction(`${verb} ${where}?`))) return;
    try {
      const result = await write(`api/dead-letters/${action}`, { letters });
      if (action === "requeue") {
        const skipped = result.skipped.map((item) => `${item.id}: ${item.reason}`).join("; ");
        notice(`requeued ${result.requeued.length}${skipped ? `, skipped ${result.skipped.length} (${skipped})` : ""}`,
          result.skipped.length > 0);
      } else {
        notice(`purged ${result.purged}`);
      }
      for (const letter of letters) picked.delete(`${letter.stream}\n${letter.id}`);
      const open = $("#letter .letter");
      if (open && letters.some((l) => l.stream === open.dataset.stream && l.id === open.dataset.id)) {
        $("#letter").textContent = "";
      }
      await refreshLetters();
    } catch (error) {
      notice(`${action} failed: ${error.message}`, true);
    }
  }

  function onClick(event) {
    const target = event.target;
    if (!(target instanceof HTMLElement)) return;
    if (target.matches(".open-letter")) {
      openLetter(target.dataset.stream, target.dataset.id).catch((error) => notice(error.message, true));
    } else if (target.matches(".close-letter")) {
      $("#letter").textContent = "";
    } else if (target.matches(".letter-requeue, .letter-purge")) {
      act(target.matches(".letter-requeue") ? "requeue" : "purge", [{ stream: target.dataset.stream, id: target.dataset.id }]);
    } else if (target.id === "requeue-selected" || target.id === "purge-selected") {
      act(target.id === "requeue-selected" ? "requeue" : "purge", selection());
    }
  }

  function onChange(event) {
    const target = event.target;
    if (target.matches(".pick")) {
      if (target.checked) picked.add(key(target));
      else picked.delete(key(target));
    } else if (target.id === "pick-all") {
      for (const box of document.querySelectorAll("#dead-letters .pick")) {
        box.checked = target.checked;
        if (target.checked) picked.add(key(box));
        else picked.delete(key(box));
      }
    }
    updateButtons();
  }

  // -- replay --------------------------------------------------------------------------------------------------

  function replayForm() {
    return {
      stream: $("#replay-stream").value.trim(),
      from: $("#replay-from").value.trim() || "-",
      to: $("#replay-to").value.trim() || "+",
      to_stream: $("#replay-to-stream").value.trim(),
    };
  }

  async function plan() {
    const form = replayForm();
    const params = new URLSearchParams(form);
    const response = await fetch(`api/replay-plan?${params}`, { cache: "no-store" });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  async function showPlan() {
    try {
      const data = await plan();
      $("#replay-result").textContent = data.count
        ? `${data.count} entries from ${data.first_id} to ${data.last_id} of ${data.stream} would be appended to ${data.to_stream}`
        : `no entries of ${data.stream} in that range`;
    } catch (error) {
      $("#replay-result").textContent = `cannot plan: ${error.message}`;
    }
  }

  async function runReplay(event) {
    event.preventDefault();
    try {
      const data = await plan();
      if (!data.count) {
        $("#replay-result").textContent = `no entries of ${data.stream} in that range`;
        return;
      }
      const message = `Append copies of ${data.count} entries of ${data.stream} (${data.first_id} to ${data.last_id}) to ${data.to_stream}?`;
      if (!(await confirmAction(message))) return;
      // The range as confirmed: entries added after the plan are not replayed.
      const result = await write("api/replay", { stream: data.stream, from: data.first_id, to: data.last_id,
        to_stream: data.to_stream });
      $("#replay-result").textContent = `replayed ${result.replayed} entries into ${result.to_stream}`;
    } catch (error) {
      $("#replay-result").textContent = `replay failed: ${error.message}`;
    }
  }

  // -- start ---------------------------------------------------------------------------------------------------

  document.addEventListener("click", onClick);
  document.addEventListener("change", onChange);
  $("#dl-filters").addEventListener("submit", readFilters);
  $("#replay").addEventListener("submit", runReplay);
  $("#replay-plan").addEventListener("click", showPlan);
  if (writable) {
    $("#unlock").addEventListener("submit", unlock);
    $("#lock").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showLock();
    });
  }
  window.addEventListener("hashchange", tokenFromHash);
  const summary = $("#live .summary");
  deadTotal = summary ? summary.dataset.deadTotal : null;
  tokenFromHash();
  showLock();
  updateButtons();
  setTimeout(poll, interval);
})();
