import VigilCore

extension AdminServer {
    /// Every event kind, for the page's stream listeners.
    static let kinds = "[" + HealingEvent.Kind.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ",") + "]"

    /// `GET /` on the admin port: a live view of the clusters (each host's state and cause in words, its share and
    /// success now and a sparkline of its tries; each cluster's latency and success over five minutes), the healing
    /// decisions and the tenants, fed by `/events/stream`, `/clusters` and `/series`. One static page served from the
    /// binary; no build step, no external script (the admin port may be air-gapped).
    static let indexPage = #"""
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><title>Vigil</title>
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <style>
        body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:90em}
        h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
        #status{color:#666} body.stale #status{color:#b00;font-weight:bold} body.stale .cluster,body.stale table{opacity:.45}
        .cluster{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.5em 0}
        .hosts{display:flex;flex-wrap:wrap;gap:.4em;margin-top:.4em}
        .host{flex:1 1 16em;max-width:26em;padding:.4em .6em;border-radius:4px;font-size:12px}
        .host .addr{font-family:monospace;font-weight:bold} .host .cause{margin:.15em 0} .host .now{color:#555}
        .healthy{background:#e3f7e3} .pending{background:#eee} .unhealthy{background:#ffe6c2} .ejected{background:#ffd6d6}
        .mode-panic,.mode-fail_fast{color:#b00;font-weight:bold}
        svg.spark{display:block;width:100%;height:34px} svg.chart{display:block;width:100%;max-width:50em;height:70px}
        .legend{font-size:11px;color:#555}
        table{border-collapse:collapse;font-size:12px;width:100%} td,th{border-bottom:1px solid #eee;padding:.25em .6em;text-align:left;vertical-align:top}
        table.events{table-layout:fixed} td{overflow-wrap:break-word} td.ev code{font-size:11px}
        .kv{display:inline-block;margin-right:.7em;max-width:100%;overflow-wrap:anywhere}
        nav a{margin-right:1em} select{font-size:12px;margin-right:.6em}
        </style></head><body>
        <h1>Vigil <span id="node"></span></h1>
        <div id="status">connecting…</div>
        <h2>Clusters</h2><div id="clusters"></div>
        <h2>Healing decisions</h2>
        <div><select id="hostFilter"><option value="">every host</option></select>
        <select id="kindFilter"><option value="">every kind</option></select></div>
        <table class="events"><colgroup><col style="width:8.5em"><col style="width:6.5em"><col style="width:9em"><col style="width:9em">
        <col style="width:9em"><col></colgroup>
        <thead><tr><th>#</th><th>time</th><th>kind</th><th>where</th><th>reason</th><th>evidence → action</th></tr></thead>
        <tbody id="events"></tbody></table>
        <h2>Tenants</h2>
        <table><thead><tr><th>tenant</th><th>rps</th><th>burst</th><th>tokens</th><th>in flight</th><th>allowed</th>
        <th>rate limited</th><th>concurrency limited</th></tr></thead><tbody id="tenants"></tbody></table>
        <h2>Endpoints</h2>
        <nav><a href="/stats">/stats</a><a href="/stats/prometheus">/stats/prometheus</a><a href="/clusters">/clusters</a>
        <a href="/series">/series</a><a href="/events">/events</a><a href="/certs">/certs</a><a href="/tenants">/tenants</a>
        <a href="/config_dump">/config_dump</a><a href="/ready">/ready</a></nav>
        <script>
        const $ = id => document.getElementById(id);
        const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
        // Times in the reader's zone, named.
        const local = t => new Date(t).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"});
        let staleSince = null, clusterEvents = [];
        function stale() {
          if (!staleSince) staleSince = new Date();
          document.body.classList.add("stale");
          $("status").textContent = "stale since " + local(staleSince) + ": Vigil does not answer; reconnecting quietly";
        }
        function live() {
          staleSince = null;
          document.body.classList.remove("stale");
          $("status").textContent = "live";
        }
        // A sparkline of one host's tries a second over five minutes, its errors in red, its ejections shaded.
        function spark(h) {
          const n = h.requests.length, W = 300, H = 34, top = Math.max(1, ...h.requests);
          const x = i => (W - n + i), y = v => H - 2 - (v / top) * (H - 4);
          const line = vs => vs.map((v, i) => `${x(i)},${y(v).toFixed(1)}`).join(" ");
          const shade = h.ejected.map((e, i) => e ? `<rect x="${x(i)}" y="0" width="1" height="${H}" fill="#f3b0b0"/>` : "").join("");
          return `<svg class="spark" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${shade}
            <polyline fill="none" stroke="#3a7" stroke-width="1" points="${line(h.requests)}"/>
            <polyline fill="none" stroke="#c22" stroke-width="1" points="${line(h.errors)}"/></svg>`;
        }
        // A cluster's p50 and p99 to the response head and its success rate over five minutes, healing events marked.
        function chart(c, times) {
          const n = c.p50_ms.length, W = 300, H = 70, top = Math.max(1, ...c.p99_ms.filter(v => v != null));
          const x = i => (W - n + i), y = v => H - 2 - (v / top) * (H - 4);
          const line = (vs, scale) => vs.map((v, i) => v == null ? null : `${x(i)},${scale(v).toFixed(1)}`).filter(Boolean).join(" ");
          // A decision is marked at the first point taken at or after it (the points' own times, not an assumed second each).
          const own = times.slice(-n), start = own[0] ?? Date.now(), end = own[own.length - 1] ?? Date.now();
          const marks = clusterEvents.filter(e => e.cluster === c.name).map(e => Date.parse(e.time)).filter(t => t >= start && t <= end)
            .map(t => x(Math.max(0, own.findIndex(p => p >= t))))
            .map(at => `<line x1="${at}" x2="${at}" y1="0" y2="${H}" stroke="#999" stroke-dasharray="2,2"/>`).join("");
          return `<svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${marks}
            <polyline fill="none" stroke="#58c" points="${line(c.p50_ms, y)}"/><polyline fill="none" stroke="#236" points="${line(c.p99_ms, y)}"/>
            <polyline fill="none" stroke="#3a7" points="${line(c.success, v => H - 2 - v * (H - 4))}"/></svg>
            <div class="legend">p50 / p99 to the response head (top: ${top} ms), success rate (green), healing decisions (dashed); last 5 minutes</div>`;
        }
        // The last ten seconds of a host: its share of the cluster's tries, and how many succeeded.
        function now(h, all) {
          const sum = a => a.slice(-10).reduce((x, y) => x + y, 0);
          const tries = sum(h.requests), total = all.reduce((x, o) => x + sum(o.requests), 0);
          if (!tries) return "no tries in the last 10 s";
          return `${Math.round(100 * tries / Math.max(total, 1))} % of the tries, ${Math.round(100 * (tries - sum(h.errors)) / tries)} % succeeded (last 10 s)`;
        }
        // One refresh at a time; a reply that does not come within 4 s, or is not a good one, makes the page stale.
        let refreshing = false;
        async function refresh() {
          if (refreshing) return;
          refreshing = true;
          let c, t, s, series;
          try {
            [c, t, s, series] = await Promise.all(["/clusters", "/tenants", "/stats", "/series"].map(u =>
              fetch(u, {signal: AbortSignal.timeout(4000)}).then(r => { if (!r.ok) throw new Error(u + ": " + r.status); return r.json(); })));
          } catch (e) { stale(); return; } finally { refreshing = false; }
          if (staleSince || $("status").textContent !== "live") live();
          $("node").textContent = "· " + s.node + " · policy " + c.policy_version;
          const seriesOf = Object.fromEntries((series.clusters || []).map(x => [x.name, x]));
          $("clusters").innerHTML = c.clusters.map(cl => {
            const sc = seriesOf[cl.name], byHost = Object.fromEntries((sc?.hosts || []).map(h => [h.address, h]));
            return `<div class="cluster"><b>${esc(cl.name)}</b> <span class="mode-${esc(cl.mode)}">${esc(cl.mode)}</span> · ${esc(cl.load_balancer)}
              ${sc ? chart(sc, series.times) : ""}<div class="hosts">` +
              cl.hosts.map(h => `<div class="host ${esc(h.state)}" data-host="${esc(h.address)}"><span class="addr">${esc(h.name || h.address)}</span>
                ${h.name ? `<span class="addr" style="font-weight:normal">${esc(h.address)}</span>` : ""}
                <div class="cause">${esc(h.cause)}</div>
                <div class="now">${byHost[h.address] ? now(byHost[h.address], sc.hosts) : ""}</div>
                ${byHost[h.address] ? spark(byHost[h.address]) : ""}</div>`).join("") + "</div></div>";
          }).join("");
          $("tenants").innerHTML = (t.tenants || []).length ? t.tenants.map(x => `<tr><td>${esc(x.name)}</td><td>${esc(x.requests_per_second)}</td>
            <td>${esc(x.burst)}</td><td>${esc(x.tokens)}</td><td>${esc(x.in_flight)}</td><td>${esc(x.allowed)}</td>
            <td>${esc(x.rate_limited)}</td><td>${esc(x.concurrency_limited)}</td></tr>`).join("")
            : `<tr><td colspan="8">${t.configured ? "no tenant has been seen yet" : "no tenants configured"}</td></tr>`;
        }
        // Words break at their underscores and dots, not in their middle.
        const soft = s => esc(s).replace(/([_.:\/])/g, "$1<wbr>");
        // Evidence as key=value, each pair kept whole where it fits, nested values inline.
        const pairs = o => Object.entries(o || {}).map(([k, v]) =>
          `<span class="kv"><code>${soft(k)}</code>=${soft(typeof v === "object" && v ? JSON.stringify(v) : v)}</span>`).join(" ");
        function option(select, value) {
          if (value && ![...select.options].some(o => o.value === value)) select.add(new Option(value, value));
        }
        function filter() {
          const host = $("hostFilter").value, kind = $("kindFilter").value;
          for (const row of $("events").rows) row.hidden = (host && row.dataset.host !== host) || (kind && row.dataset.kind !== kind);
        }
        function addEvent(e) {
          const where = e.tenant ? "tenant " + e.tenant : [e.cluster, e.host].filter(Boolean).join(" ");
          const row = document.createElement("tr");
          row.dataset.host = e.host || ""; row.dataset.kind = e.kind;
          row.innerHTML = `<td style="white-space:nowrap">${esc(e.seq)}</td><td>${esc(local(e.time))}</td>
            <td>${soft(e.kind)}</td><td>${soft(where)}</td><td>${soft(e.reason)}</td><td class="ev">${pairs(e.evidence)} → ${pairs(e.action)}</td>`;
          $("events").prepend(row);
          while ($("events").rows.length > 200) $("events").deleteRow(-1);
          option($("hostFilter"), e.host); option($("kindFilter"), e.kind);
          clusterEvents.push(e);
          if (clusterEvents.length > 500) clusterEvents.shift();
          filter();
        }
        $("hostFilter").onchange = filter; $("kindFilter").onchange = filter;
        let pending = null;
        function soon() { if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 250); }
        refresh();
        // Every 2 s while Vigil answers; every 10 s while it does not (the event stream reconnects on its own too).
        let ticks = 0;
        setInterval(() => { ticks++; if (!staleSince || ticks % 5 === 0) refresh(); }, 2000);
        const stream = new EventSource("/events/stream");
        stream.onopen = () => { refresh(); };
        stream.onerror = () => { stale(); };
        stream.addEventListener("gap", m => {
          const g = JSON.parse(m.data), row = document.createElement("tr");
          row.innerHTML = `<td colspan="6">decisions before #${esc(g.resumes_at)} are not shown: ${g.reason === "evicted" ? "they left Vigil's event buffer" : "they were made by an earlier run of Vigil"}</td>`;
          $("events").prepend(row);
        });
        for (const kind of \#(kinds)) {
          stream.addEventListener(kind, m => { addEvent(JSON.parse(m.data)); soon(); });
        }
        </script>
        </body></html>

        """#
}
