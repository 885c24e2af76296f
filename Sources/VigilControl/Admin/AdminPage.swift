import VigilCore

extension AdminServer {
    /// Every event kind, for the page's stream listeners.
    static let kinds = "[" + HealingEvent.Kind.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ",") + "]"

    /// `GET /` on the admin port: a live view of the clusters (hosts coloured by state, with the reason for
    /// each ejection), the latest healing decisions and the tenants, refreshed from `/events/stream`. One
    /// static page served from the binary; no build step, no external script.
    static let indexPage = #"""
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><title>Vigil</title>
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <style>
        body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
        h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
        #status{color:#666} .cluster{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.5em 0}
        .host{display:inline-block;margin:.25em;padding:.35em .6em;border-radius:4px;font-family:monospace;font-size:12px}
        .healthy{background:#d8f5d8} .pending{background:#eee} .unhealthy{background:#ffe0b3} .ejected{background:#ffc9c9}
        .mode-panic,.mode-fail_fast{color:#b00;font-weight:bold}
        table{border-collapse:collapse;font-size:12px} td,th{border-bottom:1px solid #eee;padding:.25em .6em;text-align:left;vertical-align:top}
        td.ev{font-family:monospace;max-width:60em;word-break:break-all}
        nav a{margin-right:1em}
        </style></head><body>
        <h1>Vigil <span id="node"></span></h1>
        <div id="status">connecting…</div>
        <h2>Clusters</h2><div id="clusters"></div>
        <h2>Healing decisions</h2>
        <table><thead><tr><th>#</th><th>time</th><th>kind</th><th>where</th><th>reason</th><th>evidence → action</th></tr></thead>
        <tbody id="events"></tbody></table>
        <h2>Tenants</h2>
        <table><thead><tr><th>tenant</th><th>rps</th><th>burst</th><th>tokens</th><th>in flight</th><th>allowed</th>
        <th>rate limited</th><th>concurrency limited</th></tr></thead><tbody id="tenants"></tbody></table>
        <h2>Endpoints</h2>
        <nav><a href="/stats">/stats</a><a href="/stats/prometheus">/stats/prometheus</a><a href="/clusters">/clusters</a>
        <a href="/events">/events</a><a href="/certs">/certs</a><a href="/tenants">/tenants</a><a href="/config_dump">/config_dump</a>
        <a href="/ready">/ready</a></nav>
        <script>
        const $ = id => document.getElementById(id);
        const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
        async function refresh() {
          const [c, t, s] = await Promise.all(["/clusters", "/tenants", "/stats"].map(u => fetch(u).then(r => r.json())));
          $("node").textContent = "· " + s.node + " · policy " + c.policy_version;
          $("clusters").innerHTML = c.clusters.map(cl => `<div class="cluster"><b>${esc(cl.name)}</b>
            <span class="mode-${esc(cl.mode)}">${esc(cl.mode)}</span> · ${esc(cl.load_balancer)}<br>` +
            cl.hosts.map(h => `<span class="host ${esc(h.state)}" title="${esc(h.last_transition || "")}">${esc(h.address)}
              ${esc(h.state)}${h.ejected_until ? " until " + esc(h.ejected_until.slice(11, 19)) : ""}
              ${h.last_transition ? "<br>" + esc(h.last_transition) : ""}</span>`).join("") + "</div>").join("");
          $("tenants").innerHTML = (t.tenants || []).map(x => `<tr><td>${esc(x.name)}</td><td>${esc(x.requests_per_second)}</td>
            <td>${esc(x.burst)}</td><td>${esc(x.tokens)}</td><td>${esc(x.in_flight)}</td><td>${esc(x.allowed)}</td>
            <td>${esc(x.rate_limited)}</td><td>${esc(x.concurrency_limited)}</td></tr>`).join("");
        }
        function addEvent(e) {
          const where = e.tenant ? "tenant " + e.tenant : [e.cluster, e.host].filter(Boolean).join(" ");
          const row = document.createElement("tr");
          row.innerHTML = `<td>${e.seq}</td><td>${esc(e.time.slice(11, 23))}</td><td>${esc(e.kind)}</td><td>${esc(where)}</td>
            <td>${esc(e.reason)}</td><td class="ev">${esc(JSON.stringify(e.evidence))} → ${esc(JSON.stringify(e.action))}</td>`;
          $("events").prepend(row);
          while ($("events").rows.length > 200) $("events").deleteRow(-1);
        }
        let pending = null;
        function soon() { if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 250); }
        refresh();
        setInterval(refresh, 5000);
        const stream = new EventSource("/events/stream");
        stream.onopen = () => { $("status").textContent = "live"; };
        stream.onerror = () => { $("status").textContent = "reconnecting…"; };
        stream.onmessage = null;
        for (const kind of \#(kinds)) {
          stream.addEventListener(kind, m => { addEvent(JSON.parse(m.data)); soon(); });
        }
        </script>
        </body></html>

        """#
}
