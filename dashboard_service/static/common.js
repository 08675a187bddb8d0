// Helpers every page uses. Agent-supplied text goes into the page only as text
// (textContent, attribute values set through the DOM), never as markup.
"use strict";

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function link(href, text) {
  return el("a", text, { href: href });
}

function agentLink(id) {
  return link("/agent/" + encodeURIComponent(id), id);
}

function artifactLink(id, text) {
  return link("/artifact/" + encodeURIComponent(id), text || id);
}

// Replace a table body's rows: each row is a list of cells (a string or a node).
function fillRows(tbody, rows) {
  const fresh = document.createDocumentFragment();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.appendChild(cell);
      else td.textContent = cell === undefined || cell === null ? "" : String(cell);
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  tbody.replaceChildren(fresh);
}

function setText(id, value) {
  const node = document.getElementById(id);
  if (node) node.textContent = value === undefined || value === null ? "–" : String(value);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function shortName(enumName, prefix) {
  return (enumName || "").replace(prefix, "").toLowerCase();
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
