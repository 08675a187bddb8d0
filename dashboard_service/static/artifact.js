// An artifact's page: its fields, its code shown as code, its contributor, its verdict.
"use strict";

const artifactId = decodeURIComponent(window.location.pathname.slice("/artifact/".length));
setText("artifact-id", artifactId);

function show(artifact) {
  const kind = ["pattern", "code_component", "os_component"].find((k) => artifact[k]) || "";
  const content = artifact[kind] || {};
  document.title = artifactId + " · kernelhub dashboard";
  setText("title", kind.replace("_", " ") + ": " + (content.name || content.pattern_type || content.pattern_id || artifactId));
  const contributor = document.getElementById("contributor");
  contributor.textContent = artifact.contributor_id || "";
  contributor.setAttribute("href", "/agent/" + encodeURIComponent(artifact.contributor_id || ""));
  setText("when", artifact.create_time ? "at " + new Date(artifact.create_time).toLocaleString() : "");
  const code = content.code || content.implementation || "";
  const rows = [];
  for (const [key, value] of Object.entries(content)) {
    if (key === "code" || key === "implementation") continue;
    rows.push([key, typeof value === "object" ? JSON.stringify(value) : value]);
  }
  fillRows(document.getElementById("fields"), rows);
  document.getElementById("code-section").hidden = !code;
  setText("language", content.language || "");
  document.getElementById("code").textContent = code;
  const verdict = artifact.verdict || null;
  const state = artifact.validation_state || (verdict && verdict.state) || "";
  document.getElementById("verdict-section").hidden = !state && !verdict;
  setText("validation-state", shortName(state, "VALIDATION_STATE_"));
  fillRows(document.getElementById("verdict"), Object.entries(verdict || {}).map(([key, value]) => [
    key, typeof value === "object" ? JSON.stringify(value) : value]));
}

getJson("/api/artifact/" + encodeURIComponent(artifactId)).then(show).catch((error) => {
  const node = document.getElementById("error");
  node.textContent = String(error.message || error);
  node.hidden = false;
});
