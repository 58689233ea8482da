// The lineage graph of a run as an SVG DAG: data units and steps are nodes, edges go unit → step
// (labelled with the input's variable in the tooltip) and step → unit. The layout is dagre's
// (vendor/dagre.esm.js); the drawing is plain SVG elements, so every node is a DOM element with
// `data-node-id`, `data-node-type` and `data-status` (what the browser tests look at) and a
// <title> that screen readers and tooltips read.

import { graphlib, layout } from "./vendor/dagre.esm.js";

const SVG = "http://www.w3.org/2000/svg";
const CHAR_WIDTH = 7.3; // the labels' monospace font at 12px
const LINE_HEIGHT = 16;
const PAD_X = 12;
const PAD_Y = 8;

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const short = (id) => id.slice(0, 8);

/** The label lines and the tooltip of one lineage node. */
function describe(node) {
  if (node.type === "step") {
    return {
      lines: [`${node.operator} r${node.revision}`, node.status],
      title: `step ${node.id}: operator ${node.operator} (revision ${node.revision}), ${node.status}`,
    };
  }
  const origin = node.stepId ? `output of step ${short(node.stepId)}` : "uploaded";
  return {
    lines: [node.dataKind, node.filename || short(node.id)],
    title: `data unit ${node.id}: ${node.dataKind}, ${node.filename} (${origin})`,
  };
}

/**
 * Draw `lineage` ({nodes, edges}) into `container`, replacing what was there.
 * `onStep(stepId)` is called when a step node is activated (click, Enter or Space).
 */
export function drawLineage(container, lineage, { onStep = null } = {}) {
  const g = new graphlib.Graph();
  g.setGraph({ rankdir: "LR", nodesep: 18, ranksep: 56, marginx: 8, marginy: 8 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const node of lineage.nodes) {
    const d = describe(node);
    const width = Math.max(...d.lines.map((l) => l.length)) * CHAR_WIDTH + 2 * PAD_X;
    const height = d.lines.length * LINE_HEIGHT + 2 * PAD_Y;
    g.setNode(node.id, { width, height, node, ...d });
  }
  for (const e of lineage.edges) {
    if (g.hasNode(e.source) && g.hasNode(e.target)) g.setEdge(e.source, e.target, { env: e.env });
  }
  layout(g);
  const { width = 0, height = 0 } = g.graph();

  const root = svg("svg", {
    class: "lineage", width: Math.ceil(width), height: Math.ceil(height),
    viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}`, role: "group",
    "aria-label": `Lineage graph: ${lineage.nodes.filter((n) => n.type === "unit").length} data units, `
      + `${lineage.nodes.filter((n) => n.type === "step").length} steps`,
  });
  root.append(svg("defs", {}, svg("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
  }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }))));

  const edges = svg("g", { class: "edges" });
  for (const e of g.edges()) {
    const label = g.edge(e);
    const d = label.points.map((p, i) => `${i ? "L" : "M"} ${p.x.toFixed(1)} ${p.y.toFixed(1)}`).join(" ");
    edges.append(svg("path", {
      d, class: "edge", "marker-end": "url(#arrow)", "data-source": e.v, "data-target": e.w,
    }, label.env ? svg("title", {}, `${label.env}`) : null));
  }
  root.append(edges);

  const nodes = svg("g", { class: "nodes" });
  for (const id of g.nodes()) {
    const n = g.node(id);
    const { node } = n;
    const status = node.type === "step" ? node.status : (node.stepId ? "output" : "upload");
    const group = svg("g", {
      class: `node ${node.type} status-${status}`,
      transform: `translate(${(n.x - n.width / 2).toFixed(1)} ${(n.y - n.height / 2).toFixed(1)})`,
      "data-node-id": id, "data-node-type": node.type, "data-status": status,
    }, svg("title", {}, n.title));
    group.append(svg("rect", { width: n.width, height: n.height, rx: node.type === "unit" ? 14 : 3 }));
    n.lines.forEach((line, i) => {
      group.append(svg("text", { x: PAD_X, y: PAD_Y + (i + 1) * LINE_HEIGHT - 4, class: i ? "sub" : "main" }, line));
    });
    if (node.type === "step" && onStep) {
      group.setAttribute("tabindex", "0");
      group.setAttribute("role", "button");
      group.setAttribute("aria-label", `${n.title}; show its logs`);
      group.addEventListener("click", () => onStep(id));
      group.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") {
          ev.preventDefault();
          onStep(id);
        }
      });
    }
    nodes.append(group);
  }
  root.append(nodes);
  container.replaceChildren(root);
}
