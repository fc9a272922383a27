// The dataset browser (`data_generator view DIR`): a paged table of records with search and
// filters, a record view, and the inspect summary drawn as charts. Search, filters, page and the
// open record live in the URL's fragment, so a link can be shared. Model and input text is data:
// every element is built with textContent, never parsed as markup.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const SVG = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  };
  const FIELDS = ["q", "id", "stage", "status", "done_reason", "kept", "order", "page", "rec", "tab", "sstage"];
  let info = null;
  let lastRows = null;
  let loadSeq = 0;

  function api(path, params) {
    const p = new URLSearchParams(params || {});
    if (token) p.set("token", token);
    const qs = p.toString();
    return fetch(path + (qs ? "?" + qs : ""), { cache: "no-store" }).then((r) => {
      if (!r.ok) return r.text().then((t) => Promise.reject(new Error(r.status + ": " + t.trim())));
      return r.json();
    });
  }

  // The state in the URL fragment: #q=...&stage=...&page=2&rec=17
  function getState() {
    const h = new URLSearchParams(location.hash.slice(1));
    const s = {};
    for (const k of FIELDS) {
      const v = h.get(k);
      if (v) s[k] = v;
    }
    return s;
  }
  function setState(changes, replace) {
    const s = Object.assign(getState(), changes);
    const h = new URLSearchParams();
    for (const k of FIELDS) if (s[k] !== undefined && s[k] !== null && s[k] !== "") h.set(k, s[k]);
    const url = location.pathname + location.search + "#" + h.toString();
    if (replace) history.replaceState(null, "", url);
    else history.pushState(null, "", url);
    render();
  }

  function fmt(n) {
    if (n === null || n === undefined) return "";
    if (typeof n !== "number") return String(n);
    if (Math.abs(n) >= 1000) return Math.round(n).toLocaleString("en");
    return Number.isInteger(n) ? String(n) : n.toFixed(1);
  }
  function bytes(n) {
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }

  // ---- header ----
  function renderInfo() {
    if (!info) return;
    $("name").textContent = info.name;
    document.title = info.name + " · data_generator view";
    const indexed = info.files.reduce((a, f) => a + f.indexed_bytes, 0);
    const total = info.files.reduce((a, f) => a + f.bytes, 0);
    const state = $("state");
    if (info.error) { state.textContent = "cannot read: " + info.error; state.className = "state bad"; }
    else if (info.indexing) { state.textContent = "indexing " + Math.floor((100 * indexed) / Math.max(total, 1)) + "% of " + bytes(total) + "…"; state.className = "state"; }
    else { state.textContent = bytes(total) + " indexed"; state.className = "state live"; }
    const parts = [fmt(info.records) + " records"];
    if (info.stages.length) parts.push("stages " + info.stages.map((s, i) => s + " " + fmt(info.per_stage[i])).join(" → "));
    if (info.dataset_rows !== null && info.dataset_rows !== undefined) parts.push(fmt(info.dataset_rows) + " rows through every stage");
    if (info.failures) {
      const lines = info.failures === info.failed_requests ? "" : " (" + fmt(info.failures) + " failure lines)";
      parts.push(fmt(info.failed_requests) + (info.failed_requests === 1 ? " request" : " requests") + " failed" + lines + ", " + fmt(info.unresolved_requests) + " still without a record");
    }
    const malformed = info.files.filter((f) => f.malformed > 0);
    for (const f of malformed) parts.push(f.file + ": " + f.malformed + " malformed lines (first: line " + f.first_malformed.line + ")");
    if (info.last_run && info.last_run.status) parts.push("last run: " + info.last_run.status);
    $("counts").textContent = parts.join(" · ");
    // Filter choices.
    $("stage-box").hidden = !info.stages.length;
    fillSelect($("stage"), info.stages.map((s) => [s, s]), "any");
    $("summary-stage-box").hidden = !info.stages.length;
    fillSelect($("summary-stage"), info.stages.map((s) => [s, s]), null);
    fillSelect($("done_reason"), info.done_reasons.map(([d, c]) => [d, d + " (" + fmt(c) + ")"]), "any");
    $("kept-box").hidden = !info.judged;
    document.body.classList.toggle("multi", info.stages.length > 0);
    document.body.classList.toggle("judged", info.judged > 0);
  }
  function fillSelect(sel, options, anyLabel) {
    const keep = sel.value;
    const opts = anyLabel ? [["", anyLabel]].concat(options) : options;
    const same = sel.options.length === opts.length && opts.every(([v, l], i) => sel.options[i].value === v && sel.options[i].textContent === l);
    if (same) return;
    sel.replaceChildren(...opts.map(([v, l]) => { const o = el("option", null, l); o.value = v; return o; }));
    sel.value = keep;
  }

  // ---- records ----
  let inFlight = false;
  function renderRecords() {
    const s = getState();
    // Not under the user's fingers: text typed and not yet searched stays.
    if (document.activeElement !== $("q") && !searchTimer) $("q").value = s.q || "";
    for (const k of ["stage", "status", "done_reason", "kept"]) {
      const sel = $(k);
      if (s[k] && ![...sel.options].some((o) => o.value === s[k])) {
        // A shared link may name a value this page does not list yet: show it anyway.
        const o = el("option", null, s[k]);
        o.value = s[k];
        sel.append(o);
      }
      sel.value = s[k] || "";
    }
    $("newest").checked = s.order === "newest";
    $("id-chip").hidden = !s.id;
    $("id-value").textContent = s.id || "";
    const params = {};
    for (const k of ["q", "id", "stage", "status", "done_reason", "kept", "order", "page"]) if (s[k]) params[k] = s[k];
    const seq = ++loadSeq;
    inFlight = true;
    $("page-info").textContent = s.q ? "searching…" : "loading…";
    api("api/records", params).then((r) => {
      if (seq !== loadSeq) return;
      lastRows = r;
      drawRows(r);
    }).catch((e) => {
      if (seq !== loadSeq) return;
      $("page-info").textContent = String(e.message || e);
    }).finally(() => { if (seq === loadSeq) inFlight = false; });
  }

  function drawRows(r) {
    const tbody = $("rows");
    tbody.replaceChildren(...r.rows.map(rowElement));
    $("empty").hidden = r.total > 0;
    const more = r.indexing ? " (indexing: more to come)" : "";
    $("page-info").textContent = "page " + fmt(r.page) + " of " + fmt(r.pages) + " · " + fmt(r.total) + " matching" + more;
    $("prev").disabled = r.page <= 1;
    $("next").disabled = r.page >= r.pages;
  }

  function rowElement(r) {
    const tr = el("tr", r.failed ? (r.resolved ? "failed resolved" : "failed") : null);
    tr.dataset.loc = r.loc;
    const id = r.id + (r.sample ? " #" + r.sample : "");
    const respCell = el("td", "text");
    if (r.failed) {
      respCell.append(el("span", "badge bad", r.resolved ? "failed, resolved later" : "failed"), document.createTextNode(" " + (r.error || "")));
    } else {
      respCell.textContent = r.response || "";
    }
    const kept = r.kept === null || r.kept === undefined ? "" : r.kept ? "yes" : "no";
    tr.append(
      el("td", "num muted", r.n + 1),
      el("td", "id", id),
      el("td", "col-stage", r.stage || ""),
      el("td", "model", r.model || ""),
      el("td", "text", r.prompt || ""),
      respCell,
      el("td", "num", r.tokens === null ? "" : fmt(r.tokens)),
      el("td", r.done_reason === "length" ? "warn" : null, r.done_reason || ""),
      el("td", "num", r.invalid ? r.invalid : ""),
      el("td", "col-kept " + (kept === "no" ? "warn" : ""), kept),
    );
    tr.addEventListener("click", () => setState({ rec: r.loc }));
    return tr;
  }

  // ---- one record ----
  function renderRecord(loc) {
    const box = $("record");
    if (loc === undefined) { box.hidden = true; return; }
    box.hidden = false;
    $("record-title").textContent = "record";
    const body = $("record-body");
    body.replaceChildren(el("p", "muted", "loading…"));
    api("api/record", { loc }).then((r) => {
      if (getState().rec !== loc) return;
      const rec = r.record || {};
      $("record-title").textContent = (r.failed ? "failure: " : "") + (rec.id || "?") + (rec.sample ? " #" + rec.sample : "") + (r.stage ? " · " + r.stage : "");
      const meta = el("table", "meta");
      const skip = new Set(["prompt", "response", "thinking", "system", "input", "parsed", "error", "last_reply", "validation_errors"]);
      const addMeta = (k, v) => {
        const tr = el("tr");
        tr.append(el("th", null, k), el("td", null, typeof v === "object" ? JSON.stringify(v) : v));
        meta.append(tr);
      };
      addMeta("file", r.file + " @ byte " + fmt(r.offset));
      if (r.failed) addMeta("status", r.resolved ? "failed, resolved by a later record" : "failed");
      for (const [k, v] of Object.entries(rec)) if (!skip.has(k) && v !== null && v !== undefined) addMeta(k, v);
      const parts = [meta];
      const before = info && r.stage ? info.stages[info.stages.indexOf(r.stage) - 1] : undefined;
      if (rec.parent && before) {
        // The row this one came from: the earlier stage's record of that id, opened.
        const a = el("a", "link", "open the " + before + " record it came from (" + rec.parent + ")");
        a.href = "#" + new URLSearchParams({ id: rec.parent, stage: before }).toString();
        a.addEventListener("click", (e) => {
          e.preventDefault();
          api("api/records", { id: rec.parent, stage: before, per: 1 }).then((p) => {
            if (p.rows.length) setState({ rec: p.rows[0].loc });
            else setState({ id: rec.parent, stage: before, q: "", page: "", rec: "" });
          }).catch(() => setState({ id: rec.parent, stage: before, q: "", page: "", rec: "" }));
        });
        const p = el("p");
        p.append(a);
        parts.push(p);
      }
      const text = (title, t, cls) => {
        if (t === null || t === undefined || t === "") return;
        parts.push(el("h3", null, title), el("pre", cls || null, t));
      };
      text("error", rec.error, "bad");
      if (rec.validation_errors) text("validation errors", rec.validation_errors.join("\n"), "bad");
      text("last reply", rec.last_reply);
      text("system", rec.system);
      text("prompt", rec.prompt);
      text("thinking", rec.thinking, "thinking");
      text("response", rec.response);
      if (rec.parsed !== undefined && rec.parsed !== null) parts.push(el("h3", null, "parsed"), tree(rec.parsed, true));
      if (rec.input && Object.keys(rec.input).length) parts.push(el("h3", null, "input"), tree(rec.input, true));
      body.replaceChildren(...parts);
    }).catch((e) => body.replaceChildren(el("p", "bad", String(e.message || e))));
  }

  // A JSON value as a tree of <details>: objects and arrays fold, scalars show their JSON type.
  function tree(v, open) {
    if (v === null || typeof v !== "object") {
      return el("span", "json-" + (v === null ? "null" : typeof v), typeof v === "string" ? JSON.stringify(v) : String(v));
    }
    const isArr = Array.isArray(v);
    const entries = isArr ? v.map((x, i) => [i, x]) : Object.entries(v);
    const d = el("details", "tree");
    d.open = open || entries.length <= 8;
    const n = entries.length;
    d.append(el("summary", "muted", isArr ? "[" + n + (n === 1 ? " item]" : " items]") : "{" + n + (n === 1 ? " key}" : " keys}")));
    const ul = el("ul");
    for (const [k, x] of entries) {
      const li = el("li");
      li.append(el("span", "key", String(k) + ": "), tree(x, false));
      ul.append(li);
    }
    d.append(ul);
    return d;
  }

  // ---- summary ----
  let summaryTimer = null;
  let summarySeq = 0;
  function renderSummary() {
    clearTimeout(summaryTimer);
    const s = getState();
    const stage = info && info.stages.length ? s.sstage || info.stages[info.stages.length - 1] : "";
    if (stage) $("summary-stage").value = stage;
    const box = $("summary");
    const seq = ++summarySeq;
    api("api/summary", stage ? { stage } : {}).then((r) => {
      // A late answer for another stage (or after leaving the tab) is not drawn.
      if (seq !== summarySeq || getState().tab !== "summary") return;
      if (r.error && !r.report) { box.replaceChildren(el("p", "bad", r.error)); return; }
      if (!r.report) {
        box.replaceChildren(el("p", "muted", "reading the whole file for the summary…"));
        summaryTimer = setTimeout(renderSummary, 1000);
        return;
      }
      drawSummary(r.report, r.stale);
      if (r.running) summaryTimer = setTimeout(renderSummary, 2000);
    }).catch((e) => box.replaceChildren(el("p", "bad", String(e.message || e))));
  }

  function drawSummary(rep, stale) {
    const box = $("summary");
    const panels = [];
    const facts = el("div", "panel");
    facts.append(el("h2", null, "Records" + (stale ? " (updating…)" : "")));
    const lines = [
      fmt(rep.records) + " records, " + fmt(rep.unique) + " unique (id, sample)" + (rep.repeated ? ", " + fmt(rep.repeated) + " repeated" : ""),
      "empty responses: " + fmt(rep.empty_responses) + " · duplicate responses: " + fmt(rep.duplicate_responses),
      "contain the prompt: " + fmt(rep.contains_prompt) + " · with U+FFFD: " + fmt(rep.replacement_chars) + " · with thinking: " + fmt(rep.with_thinking),
      "cut off by num_predict: " + (100 * rep.length_share).toFixed(1) + "%",
    ];
    if (rep.malformed) lines.push(fmt(rep.malformed) + " malformed lines");
    if (rep.kept) lines.push("kept " + fmt(rep.kept[0]) + " of " + fmt(rep.kept[1]) + " judged");
    if (rep.failures) lines.push("failures: " + fmt(rep.failures.unresolved) + " unresolved, " + fmt(rep.failures.resolved) + " resolved later");
    const ul = el("ul", "lines");
    ul.append(...lines.map((l) => el("li", null, l)));
    facts.append(ul);
    panels.push(facts);
    panels.push(barsPanel("done_reason", Object.entries(rep.done_reasons)));
    panels.push(barsPanel("models", Object.entries(rep.models)));
    if (rep.failures && rep.failures.top_errors.length) panels.push(barsPanel("top errors", rep.failures.top_errors));
    panels.push(histPanel("completion tokens", rep.completion_tokens));
    panels.push(histPanel("response characters", rep.response_chars));
    panels.push(histPanel("tokens per second", rep.tokens_per_sec));
    if (rep.structured) {
      const st = rep.structured;
      const p = el("div", "panel");
      p.append(el("h2", null, "parsed (structured output)"));
      p.append(el("p", "muted", fmt(st.records) + " parsed · " + fmt(st.reasked) + " needed a re-ask (" + fmt(st.invalid_replies) + " invalid replies)"));
      const t = el("table", "meta");
      for (const [k, f] of Object.entries(st.fields)) {
        const tr = el("tr");
        const desc = [Object.entries(f.types).map(([ty, c]) => ty + " " + fmt(c)).join(", ")];
        if (f.min !== null && f.min !== undefined) desc.push("min " + fmt(f.min) + " · mean " + fmt(f.mean) + " · max " + fmt(f.max));
        if (f.top.length) desc.push("top: " + f.top.map(([v, c]) => v + " (" + fmt(c) + ")").join(", "));
        tr.append(el("th", null, k), el("td", null, desc.join(" · ")));
        t.append(tr);
      }
      p.append(t);
      panels.push(p);
    }
    box.replaceChildren(...panels);
  }

  // Horizontal bars: one per (label, count).
  function barsPanel(title, pairs) {
    const p = el("div", "panel");
    p.append(el("h2", null, title));
    if (!pairs.length) { p.append(el("p", "muted", "none")); return p; }
    const max = Math.max(...pairs.map((x) => x[1]), 1);
    const list = el("div", "bars");
    for (const [label, count] of pairs) {
      const row = el("div", "bar-row");
      const bar = el("div", "bar");
      bar.style.width = Math.max(1, (100 * count) / max) + "%";
      const track = el("div", "bar-track");
      track.append(bar);
      const name = el("span", "bar-label", label);
      name.title = label;
      row.append(name, track, el("span", "bar-count", fmt(count)));
      list.append(row);
    }
    p.append(list);
    return p;
  }

  // A histogram (the inspect report's bins) as SVG columns, with its quantiles.
  function histPanel(title, d) {
    const p = el("div", "panel");
    p.append(el("h2", null, title));
    if (!d || !d.count) { p.append(el("p", "muted", "no values")); return p; }
    p.append(el("p", "muted", "min " + fmt(d.min) + " · median " + fmt(d.median) + " · p90 " + fmt(d.p90) + " · p99 " + fmt(d.p99) + " · max " + fmt(d.max)));
    const W = 600, H = 140, bins = d.histogram;
    const max = Math.max(...bins.map((b) => b.count), 1);
    const s = svg("svg", { viewBox: "0 0 " + W + " " + (H + 18), class: "hist", role: "img" });
    const bw = W / Math.max(bins.length, 1);
    bins.forEach((b, i) => {
      const h = b.count ? Math.max(1, (H * b.count) / max) : 0;
      const r = svg("rect", { x: i * bw + 1, y: H - h, width: Math.max(bw - 2, 1), height: h, class: "col" });
      const t = svg("title");
      t.textContent = fmt(b.from) + "–" + fmt(b.to) + ": " + fmt(b.count);
      r.append(t);
      s.append(r);
    });
    const lo = svg("text", { x: 0, y: H + 14, class: "axis" });
    lo.textContent = fmt(bins[0].from);
    const hi = svg("text", { x: W, y: H + 14, class: "axis", "text-anchor": "end" });
    hi.textContent = fmt(bins[bins.length - 1].to);
    s.append(lo, hi);
    p.append(s);
    return p;
  }

  // ---- wiring ----
  function render() {
    const s = getState();
    const summary = s.tab === "summary";
    $("records-view").hidden = summary;
    $("summary-view").hidden = !summary;
    $("tab-records").className = summary ? "" : "on";
    $("tab-summary").className = summary ? "on" : "";
    if (summary) renderSummary();
    else renderRecords();
    renderRecord(s.rec);
  }

  let searchTimer = null;
  $("q").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { searchTimer = null; setState({ q: $("q").value, page: "" }, true); }, 350);
  });
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(searchTimer); searchTimer = null; setState({ q: $("q").value, page: "" }); });
  for (const k of ["stage", "status", "done_reason", "kept"]) $(k).addEventListener("change", () => setState({ [k]: $(k).value, page: "" }));
  $("newest").addEventListener("change", () => setState({ order: $("newest").checked ? "newest" : "", page: "" }));
  $("clear").addEventListener("click", () => setState({ q: "", id: "", stage: "", status: "", done_reason: "", kept: "", order: "", page: "" }));
  $("prev").addEventListener("click", () => setState({ page: String(Math.max(1, (lastRows ? lastRows.page : 1) - 1)) }));
  $("next").addEventListener("click", () => setState({ page: String((lastRows ? lastRows.page : 1) + 1) }));
  $("id-clear").addEventListener("click", () => setState({ id: "", page: "" }));
  $("record-close").addEventListener("click", () => setState({ rec: "" }));
  $("summary-stage").addEventListener("change", () => setState({ sstage: $("summary-stage").value }));
  $("tab-records").addEventListener("click", (e) => { e.preventDefault(); setState({ tab: "" }); });
  $("tab-summary").addEventListener("click", (e) => { e.preventDefault(); setState({ tab: "summary" }); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && getState().rec) setState({ rec: "" }); });
  window.addEventListener("popstate", render);
  window.addEventListener("hashchange", render);

  // The folder's figures, again every two seconds while indexing or while a run appends; the
  // table follows when the index grew and the first page (or newest-first) is shown.
  function poll() {
    api("api/info").then((i) => {
      const first = info === null;
      const grew = info && (i.records + i.failures !== info.records + info.failures || i.generation !== info.generation);
      info = i;
      renderInfo();
      const s = getState();
      if (first) render();
      else if (grew && !inFlight && s.tab !== "summary" && (!s.page || s.page === "1" || s.order === "newest" || i.indexing)) renderRecords();
    }).catch((e) => { $("state").textContent = String(e.message || e); $("state").className = "state bad"; })
      .finally(() => setTimeout(poll, info && info.indexing ? 700 : 2000));
  }
  poll();
})();
