// The live view: a snapshot when the page connects, then batches of changes over Server-Sent
// Events. Model and input text is data: every element is built with textContent, never parsed
// as markup.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token");
  const withToken = (path) => (token ? path + "?token=" + encodeURIComponent(token) : path);
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const state = { jobs: new Map(), finished: [], failures: [], rates: [], ended: null, status: null };

  function setLines(ul, lines) {
    ul.replaceChildren(...(lines || []).map((l) => el("li", null, l)));
  }

  function renderStatus() {
    const s = state.status;
    if (!s) return;
    $("name").textContent = s.name;
    document.title = s.name + ": " + s.done + "/" + s.total + " · data_generator";
    const parts = [s.done + "/" + s.total + " done"];
    if (s.already_done > 0) parts.push("(" + s.already_done + " from earlier runs)");
    if (s.failed > 0) parts.push(s.failed + " failed");
    parts.push(s.in_flight + " in flight", s.tokens_per_sec + " tok/s", "elapsed " + s.elapsed, "ETA " + (s.paused ? "paused" : s.eta || "?"));
    $("counts").textContent = parts.join(" · ");
    $("alerts").replaceChildren(...(s.alerts || []).map((a) => el("div", null, a)));
    setLines($("stages"), s.stages);
    setLines($("servers"), s.servers);
    if (!(s.stages || []).length && !(s.servers || []).length) {
      $("stages").replaceChildren(el("li", "muted", "one stage, one server"));
    }
  }

  function jobCard(id, job) {
    const card = el("div", "job");
    card.dataset.id = id;
    const head = el("div", "head");
    head.append(el("span", "label", job.label), el("span", "phase", job.phase));
    const thinking = el("pre", "thinking", job.thinking);
    thinking.hidden = !job.thinking;
    const text = el("pre", "text", job.text);
    card.append(head, thinking, text);
    return card;
  }

  function renderJobs() {
    const box = $("jobs");
    const cards = new Map([...box.children].map((c) => [c.dataset.id, c]));
    for (const [id, card] of cards) if (!state.jobs.has(id)) card.remove();
    for (const [id, job] of state.jobs) {
      let card = cards.get(id);
      if (!card) {
        card = jobCard(id, job);
        box.append(card);
      } else {
        card.querySelector(".phase").textContent = job.phase + (job.attempt > 1 ? " (attempt " + job.attempt + ")" : "");
        const t = card.querySelector("pre.thinking");
        if (t.textContent !== job.thinking) {
          t.textContent = job.thinking;
          t.hidden = !job.thinking;
        }
        const p = card.querySelector("pre.text");
        if (p.textContent !== job.text) {
          const atEnd = p.scrollTop + p.clientHeight >= p.scrollHeight - 4;
          p.textContent = job.text;
          if (atEnd) p.scrollTop = p.scrollHeight;
        }
      }
    }
    $("flight-count").textContent = "(" + state.jobs.size + ")";
  }

  function rowItem(row, failure) {
    const li = el("li", failure ? "row failure" : "row");
    const summary = el("div", "summary");
    summary.append(el("span", "label", row.label), el("span", "text", failure ? row.error : row.response));
    const full = el("div", "full");
    if (failure) {
      full.append(el("h3", null, "error"), el("pre", null, row.error));
    } else {
      if (row.prompt !== null && row.prompt !== undefined) full.append(el("h3", null, "prompt"), el("pre", null, row.prompt));
      if (row.thinking) full.append(el("h3", null, "thinking"), el("pre", "thinking", row.thinking));
      full.append(el("h3", null, "response (" + row.tokens + " tokens)"), el("pre", null, row.response));
    }
    full.append(el("div", "muted", row.at));
    li.append(summary, full);
    li.addEventListener("click", (e) => {
      if (e.target.closest(".full") && li.classList.contains("open")) return;
      li.classList.toggle("open");
    });
    return li;
  }

  function renderLists() {
    $("finished").replaceChildren(...state.finished.slice().reverse().map((r) => rowItem(r, false)));
    $("failures").replaceChildren(...state.failures.slice().reverse().map((r) => rowItem(r, true)));
  }

  function renderChart() {
    const c = $("chart");
    const ctx = c.getContext("2d");
    const w = (c.width = c.clientWidth * devicePixelRatio);
    const h = (c.height = 140 * devicePixelRatio);
    ctx.clearRect(0, 0, w, h);
    const pts = state.rates;
    const style = getComputedStyle(document.documentElement);
    ctx.strokeStyle = style.getPropertyValue("--line");
    ctx.strokeRect(0, 0, w, h);
    if (pts.length < 2) return;
    const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
    const max = Math.max(1, ...pts.map((p) => p[1]));
    ctx.strokeStyle = style.getPropertyValue("--accent");
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.beginPath();
    pts.forEach((p, i) => {
      const x = ((p[0] - t0) / Math.max(1e-9, t1 - t0)) * (w - 8) + 4;
      const y = h - 4 - (p[1] / max) * (h - 24);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = style.getPropertyValue("--muted");
    ctx.font = 11 * devicePixelRatio + "px system-ui, sans-serif";
    ctx.fillText("max " + max.toFixed(1) + " tok/s", 8, 14 * devicePixelRatio);
  }

  function renderEnded() {
    const box = $("ended");
    if (!state.ended) return;
    const e = state.ended;
    box.hidden = false;
    box.className = "ended " + (e.exit_code === 0 ? "ok" : "bad");
    box.textContent = "Run ended: " + e.status + " (exit " + e.exit_code + ")\n" + (e.summary || []).join("\n");
    $("state").textContent = "ended";
    $("state").className = "state";
  }

  function render() {
    renderStatus();
    renderJobs();
    renderLists();
    renderChart();
    renderEnded();
  }

  function applySnapshot(s) {
    state.status = s.status && s.status.name ? s.status : state.status;
    state.jobs = new Map(s.jobs.map((j) => [String(j.id), Object.assign({}, j.job)]));
    state.finished = s.finished;
    state.failures = s.failures;
    state.rates = s.rates;
    state.ended = s.ended;
  }

  function applyBatch(b) {
    if (b.status && b.status.name) state.status = b.status;
    // New requests, and requests asked again (their text restarts), come whole.
    for (const s of b.started) state.jobs.set(String(s.id), Object.assign({}, s.job));
    for (const [id, p] of Object.entries(b.phases)) {
      const j = state.jobs.get(id);
      if (j) {
        j.phase = p.phase;
        j.attempt = p.attempt;
      }
    }
    for (const [id, a] of Object.entries(b.appended)) {
      const j = state.jobs.get(id);
      if (j) {
        if (a.text) j.text += a.text;
        if (a.thinking) j.thinking += a.thinking;
      }
    }
    for (const id of b.gone) state.jobs.delete(String(id));
    state.finished = state.finished.concat(b.finished).slice(-50);
    state.failures = state.failures.concat(b.failures).slice(-50);
    state.rates = state.rates.concat(b.rates);
    if (b.ended) state.ended = b.ended;
  }

  let pending = false;
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      render();
    });
  }

  const source = new EventSource(withToken("api/events"));
  source.addEventListener("open", () => {
    if (!state.ended) {
      $("state").textContent = "live";
      $("state").className = "state live";
    }
  });
  source.addEventListener("snapshot", (e) => {
    applySnapshot(JSON.parse(e.data));
    schedule();
  });
  source.addEventListener("batch", (e) => {
    applyBatch(JSON.parse(e.data));
    schedule();
  });
  source.addEventListener("error", () => {
    if (state.ended) {
      source.close();
      return;
    }
    $("state").textContent = "reconnecting…";
    $("state").className = "state";
  });
  window.addEventListener("resize", schedule);
})();
