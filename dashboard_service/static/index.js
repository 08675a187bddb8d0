// The live page: one server-sent event stream of snapshots (a few a second), drawn
// into the cards, charts and tables without reloading.
"use strict";

const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777",
  "#65a30d", "#ea580c", "#4b5563", "#0d9488", "#9333ea"];
const KIND_NAMES = { pattern: "patterns", code_component: "code components", os_component: "OS components" };
const STATES = ["PROPOSED", "ACTIVE", "COMPLETED", "DECLINED", "EXPIRED"];
const PAGE = 25;
let agentsOffset = 0;
let graphKey = "";

function chart(id, type, options) {
  return new Chart(document.getElementById(id), {
    type: type,
    data: { labels: [], datasets: [] },
    options: Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, options || {}),
  });
}

const sharesChart = chart("shares-chart", "line", {
  elements: { point: { radius: 0 } },
  scales: { y: { beginAtZero: true, title: { display: true, text: "shares / s" } } },
});
const specsChart = chart("specs-chart", "bar", { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } });
const collabsChart = chart("collabs-chart", "bar", { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } });
const graph = cytoscape({
  container: document.getElementById("graph"),
  style: [
    { selector: "node", style: { label: "data(label)", "font-size": 8, width: 8, height: 8, "background-color": "#2563eb" } },
    { selector: "edge", style: { width: "data(width)", "line-color": "#94a3b8", opacity: 0.7 } },
  ],
  userZoomingEnabled: true,
});
graph.on("tap", "node", (event) => { window.location.href = "/agent/" + encodeURIComponent(event.target.data("agent")); });

function drawShares(shares) {
  sharesChart.data.labels = shares.seconds.map((s) => new Date(s * 1000).toLocaleTimeString());
  sharesChart.data.datasets = Object.keys(shares.by_kind).map((kind, i) => ({
    label: KIND_NAMES[kind] || kind, data: shares.by_kind[kind], borderColor: COLORS[i], backgroundColor: COLORS[i],
    borderWidth: 1.5, tension: 0.2,
  }));
  sharesChart.update("none");
}

function drawBars(target, labels, values) {
  target.data.labels = labels;
  target.data.datasets = [{ data: values, backgroundColor: labels.map((_, i) => COLORS[i % COLORS.length]) }];
  target.update("none");
}

function drawGraph(edges) {
  const key = JSON.stringify(edges);
  if (key === graphKey) return;
  graphKey = key;
  const nodes = new Set();
  for (const e of edges) { nodes.add(e.a); nodes.add(e.b); }
  const elements = [];
  // Nodes and edges share one id space: prefixed apart, so an agent named "e0" is no edge.
  for (const id of nodes) elements.push({ data: { id: "a:" + id, agent: id, label: id } });
  edges.forEach((e, i) => elements.push({ data: { id: "p:" + i, source: "a:" + e.a, target: "a:" + e.b, width: Math.min(1 + e.count, 6) } }));
  graph.elements().remove();
  graph.add(elements);
  graph.layout({ name: "circle", animate: false }).run();
  setText("graph-note", nodes.size + " agents, " + edges.length + " pairs");
}

function drawAgents() {
  getJson("/api/agents?offset=" + agentsOffset + "&limit=" + PAGE).then((page) => {
    fillRows(document.getElementById("agents-table"), page.agents.map((a) => [
      agentLink(a.agent_id), a.specialization.toLowerCase(), a.version, a.capabilities]));
    const end = Math.min(page.offset + page.agents.length, page.total);
    setText("agents-range", page.total ? (page.offset + 1) + "–" + end + " of " + page.total : "none");
    document.getElementById("agents-prev").disabled = page.offset === 0;
    document.getElementById("agents-next").disabled = end >= page.total;
  }).catch(() => {});
}

document.getElementById("agents-prev").addEventListener("click", () => { agentsOffset = Math.max(0, agentsOffset - PAGE); drawAgents(); });
document.getElementById("agents-next").addEventListener("click", () => { agentsOffset += PAGE; drawAgents(); });

function draw(snap) {
  const hub = snap.hub || {};
  const kb = hub.knowledge_base || {};
  const status = document.getElementById("feed-status");
  status.textContent = snap.feed.watching ? "live" : ("hub unreachable" + (snap.feed.error ? ": " + snap.feed.error : ""));
  status.className = "badge " + (snap.feed.watching ? "live" : "down");
  setText("hub-version", hub.hub_version ? "hub " + hub.hub_version : "");
  setText("agents-online", hub.agents_online || 0);
  setText("agents-known", hub.agents_known || 0);
  setText("head-seq", hub.head_seq || 0);
  setText("lag", Math.max(0, Number(hub.head_seq || 0) - snap.feed.last_seq));
  setText("watch-streams", hub.watch_streams || 0);
  setText("commit-queue", hub.commit_queue_depth || 0);
  setText("last-commit", hub.last_commit_seconds ? (hub.last_commit_seconds * 1000).toFixed(1) + " ms" : "–");
  setText("patterns", kb.pattern_count || 0);
  setText("code-components", kb.code_component_count || 0);
  setText("os-components", kb.os_component_count || 0);
  setText("uptime", hub.start_time ? Math.round((Date.now() - Date.parse(hub.start_time)) / 1000) + " s" : "–");
  drawShares(snap.shares);
  const specs = snap.online_by_specialization;
  drawBars(specsChart, Object.keys(specs).map((s) => s.toLowerCase()), Object.values(specs));
  const byState = hub.collaborations_by_state || {};
  drawBars(collabsChart, STATES.map((s) => s.toLowerCase()), STATES.map((s) => Number(byState["COLLABORATION_STATE_" + s] || 0)));
  drawGraph(snap.graph);
  setText("requests-total", kb.feature_request_count || 0);
  setText("deliveries-total", hub.feature_delivery_count || 0);
  setText("requests-followed", snap.requests.followed);
  setText("requests-waiting", snap.requests.waiting);
  setText("requests-delivered", snap.requests.delivered);
  fillRows(document.getElementById("requests-table"), snap.requests.recent.map((r) => [r.feature, agentLink(r.requester), r.deliveries]));
  fillRows(document.getElementById("contributors-table"), snap.top_contributors.map(([id, n]) => [agentLink(id), n]));
  drawValidation(snap.validation);
  const other = Object.entries(snap.other_events);
  document.getElementById("other-section").hidden = other.length === 0;
  fillRows(document.getElementById("other-table"), other.map(([kind, n]) => [kind || "unknown", n]));
  fillRows(document.getElementById("events-table"), snap.recent_events.map((e) => [
    e.seq, e.kind, agentLink(e.sender), e.artifact ? artifactLink(e.artifact, e.label) : e.label]));
  setText("agents-note", snap.online_truncated ? "(the first " + snap.online_count + ")" : "");
}

function drawValidation(validation) {
  document.getElementById("validation-section").hidden = validation.verdicts === 0;
  if (validation.verdicts === 0) return;
  setText("verdicts-total", validation.verdicts);
  setText("pass-rate", validation.pass_rate === null ? "none judged" : Math.round(validation.pass_rate * 100) + "%");
  fillRows(document.getElementById("verdicts-table"), Object.entries(validation.by_state).map(([state, n]) => [state.toLowerCase(), n]));
  fillRows(document.getElementById("failures-table"), validation.recent_failures.map((f) => [
    artifactLink(f.artifact_id, f.component_id || f.artifact_id), agentLink(f.contributor), f.state.toLowerCase(), f.diagnostic]));
}

let ticks = 0;
const source = new EventSource("/api/stream");
source.onmessage = (message) => {
  draw(JSON.parse(message.data));
  if (ticks++ % 4 === 0) drawAgents();  // the agents table every two seconds
};
source.onerror = () => {
  const status = document.getElementById("feed-status");
  status.textContent = "dashboard unreachable";
  status.className = "badge down";
};
