// An agent's page: what it shared and its collaborations, paged from the hub.
"use strict";

const agentId = decodeURIComponent(window.location.pathname.slice("/agent/".length));
let artifactsToken = "";
let collabsToken = "";
setText("agent-id", agentId);
document.title = agentId + " · kernelhub dashboard";

function load(more) {
  const query = "?artifacts=" + encodeURIComponent(more === "artifacts" ? artifactsToken : "") +
    "&collaborations=" + encodeURIComponent(more === "collaborations" ? collabsToken : "");
  getJson("/api/agent/" + encodeURIComponent(agentId) + query).then((page) => {
    if (page.agent) {
      setText("agent-info", "online · " + page.agent.specialization.toLowerCase() + " · " + page.agent.version);
    } else {
      setText("agent-info", "not online now");
    }
    if (more !== "collaborations") {
      const rows = page.artifacts.map((a) => [artifactLink(a.artifact_id), a.kind, a.label, when(a.time)]);
      appendRows("artifacts-table", rows, more === "artifacts");
      artifactsToken = page.artifacts_next;
      document.getElementById("artifacts-more").hidden = !artifactsToken;
    }
    if (more !== "artifacts") {
      const rows = page.collaborations.map((c) => [
        c.session_id,
        agentLink(c.initiator_id === agentId ? c.target_id : c.initiator_id),
        shortName(c.type, "COLLABORATION_TYPE_"),
        shortName(c.state, "COLLABORATION_STATE_"),
        Math.round((c.progress || 0) * 100) + "%",
        c.result_artifact_id ? artifactLink(c.result_artifact_id) : "",
      ]);
      appendRows("collabs-table", rows, more === "collaborations");
      collabsToken = page.collaborations_next;
      document.getElementById("collabs-more").hidden = !collabsToken;
    }
  }).catch((error) => {
    const node = document.getElementById("error");
    node.textContent = String(error.message || error);
    node.hidden = false;
  });
}

function appendRows(id, rows, append) {
  const tbody = document.getElementById(id);
  if (!append) { fillRows(tbody, rows); return; }
  const extra = document.createElement("tbody");
  fillRows(extra, rows);
  tbody.append(...extra.children);
}

document.getElementById("artifacts-more").addEventListener("click", () => load("artifacts"));
document.getElementById("collabs-more").addEventListener("click", () => load("collaborations"));
load("");
