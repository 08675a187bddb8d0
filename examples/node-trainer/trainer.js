#!/usr/bin/env node
// A kernelhub trainer in plain Node.js, built from protos/kernelhub/v1/hub.proto and nothing else.
// stdout: one JSON line per notable thing (for scripts and tests); stderr: human-readable logs.
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// Settings: KERNELHUB_* environment variables, or the same names as flags (--agent-id=AI_Node_2).
const opts = { ...process.env };
for (const arg of process.argv.slice(2)) {
  const m = /^--([a-z-]+)=(.*)$/.exec(arg);
  if (!m) fail(`unexpected argument ${arg}; use --name=value, e.g. --agent-id=AI_Node_2`);
  opts[`KERNELHUB_${m[1].toUpperCase().replace(/-/g, '_')}`] = m[2];
}
const HUB = opts.KERNELHUB_HUB || 'localhost:50051';
const AGENT_ID = opts.KERNELHUB_AGENT_ID || fail('KERNELHUB_AGENT_ID is required');
const TOKEN = opts.KERNELHUB_TOKEN || fail('KERNELHUB_TOKEN is required');
const SPEC = `SPECIALIZATION_${(opts.KERNELHUB_SPECIALIZATION || 'graphics').toUpperCase()}`;
const STATE_FILE = opts.KERNELHUB_STATE_FILE || `${AGENT_ID}.seq`;
const DURATION_S = Number(opts.KERNELHUB_DURATION || 30);
const PROPOSE_TO = opts.KERNELHUB_PROPOSE_TO || '';
// What to receive: specializations, comma-separated (e.g. graphics,window_manager); empty: everything.
const SUBSCRIBE = (opts.KERNELHUB_SUBSCRIBE || '').split(',').filter(Boolean)
  .map((s) => `SPECIALIZATION_${s.toUpperCase()}`);

function fail(why) {
  console.error(`${opts.KERNELHUB_AGENT_ID || 'trainer'}: ${why}`);
  process.exit(2);
}
const log = (...args) => console.error(`[${AGENT_ID}]`, ...args);
const emit = (kind, fields) => process.stdout.write(`${JSON.stringify({ kind, ...fields })}\n`);
// The C sources we share sit next to this file, so they can be read and compiled on their own.
const source = (file) => fs.readFileSync(path.join(__dirname, 'c', file), 'utf8');

// Load the contract. Field names stay snake_case as in the .proto (and in the hub's JSON);
// enums are their names ('SPECIALIZATION_GRAPHICS'); uint64 seqs are strings, compared as BigInt.
const definition = protoLoader.loadSync('kernelhub/v1/hub.proto', {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  includeDirs: [path.join(__dirname, '..', '..', 'protos')], // google/protobuf/* are built in
});
const { HubService } = grpc.loadPackageDefinition(definition).kernelhub.v1;

// Resume by seq: the state file holds the highest event seq we processed.
let lastSeq = fs.existsSync(STATE_FILE) ? BigInt(fs.readFileSync(STATE_FILE, 'utf8').trim() || 0) : 0n;
let savedSeq = lastSeq;
function saveSeq() {
  if (lastSeq === savedSeq) return;
  fs.writeFileSync(`${STATE_FILE}.tmp`, `${lastSeq}\n`); // write, then rename: never half a file
  fs.renameSync(`${STATE_FILE}.tmp`, STATE_FILE);
  savedSeq = lastSeq;
}

// Several replicas of one hub: a list of IP addresses (10.0.0.1:50051,10.0.0.2:50051) or one DNS
// name with a record per replica (dns:///hubs.internal:50051). gRPC resolves them itself (its
// ipv4:/ipv6: and dns: resolvers) and its pick_first policy connects to one at random
// (shuffleAddressList); when a stream is lost we open a new one on the same channel, and gRPC
// connects it to a replica that answers. We never loop over the addresses ourselves.
function grpcTarget(hub) {
  if (!hub.includes(',')) return { target: hub, several: hub.startsWith('dns:') };
  const list = hub.replace(/^ipv[46]:/, '').split(',').map((a) => a.trim());
  const families = new Set(list.map((address) => {
    const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(address);
    const family = m && net.isIP(m[1] || m[2]);
    if (!m || !family || (family === 6) !== Boolean(m[1]) || !(Number(m[3]) >= 1 && Number(m[3]) <= 65535)) {
      fail(`hub address ${JSON.stringify(address)} in ${hub}: a list of hubs takes IP:PORT or `
        + '[IPv6]:PORT (gRPC resolves no list of names); for names use dns:///NAME:PORT');
    }
    return family;
  }));
  if (families.size > 1) fail(`${hub} mixes IPv4 and IPv6 addresses; give one family`);
  return { target: `ipv${[...families][0]}:${list.join(',')}`, several: true };
}
const { target: TARGET, several: SEVERAL } = grpcTarget(HUB);
// Keepalive pings (as the Python SDK's): a paused or partitioned replica fails the stream
// within 50 s instead of holding it forever. The hub permits pings 5 s apart or more.
const KEEPALIVE = { 'grpc.keepalive_time_ms': 30000, 'grpc.keepalive_timeout_ms': 20000 };
const client = new HubService(TARGET, grpc.credentials.createInsecure(), SEVERAL
  ? { ...KEEPALIVE, 'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ pick_first: { shuffleAddressList: true } }] }) }
  : KEEPALIVE);

// 1. Every call carries the bearer token as metadata; without a valid one: UNAUTHENTICATED.
const metadata = new grpc.Metadata();
metadata.add('authorization', `Bearer ${TOKEN}`);
let call = null; // the current stream; a new one after a reconnect
let reconnects = 0; // streams opened again after a loss
let attempt = 0; // reconnect attempts since a stream last stayed up STABLE_STREAM_MS
let welcomedAt = 0; // when the current stream was welcomed (0: not yet)
let failingSince = 0;

// 2. Hello must be the first message: who we are and the last seq we processed. The hub answers
// with Welcome (not a receipt), replays the events we missed since that seq, then goes live.
function connect() {
  call = client.Connect(metadata);
  const stream = call;
  call.on('data', onResponse);
  call.on('error', (err) => onStreamError(stream, err));
  call.on('status', (status) => onStatus(stream, status));
  call.write({ message_id: crypto.randomUUID(), hello: {
    agent_id: AGENT_ID, specialization: SPEC, capabilities: ['rendering', 'display_management'],
    version: 'node-example-1.0.0', resume_after_seq: lastSeq.toString(),
    // Shares and requests of these specializations (content or contributor) only; what is
    // addressed to us (collaborations, deliveries, routed requests) comes anyway. Unset: all.
    // Send it in every Hello: the replay after a reconnect applies it too. A live stream can
    // switch with send({ subscribe: { subscription } }): the receipt's seq is where it takes effect.
    subscription: { specializations: SUBSCRIBE },
  } });
  log(`connecting to ${HUB} as ${AGENT_ID} (${SPEC}), resuming after seq ${lastSeq}`);
}

// 3. Every other message carries a message_id we choose (a UUID). The hub answers each with a
// Receipt once its effects are committed, or with a RequestError. Re-sending the same id (say
// after a reconnect) is safe: the original receipt comes back with duplicate: true.
const pending = new Map(); // message_id -> { what, body, then }: sent, not yet answered
let ending = false; // set once we call call.end(): nothing may be written after it
let welcomed = false; // a stream is open and answered Hello: we may write
let introduced = false; // our opening shares went out (at the first Welcome, on any stream)
function send(body, then) {
  if (ending) return log(`not sending ${Object.keys(body)[0]}: the stream is ending`);
  const message_id = crypto.randomUUID();
  pending.set(message_id, { what: Object.keys(body)[0], body, then });
  // a oneof is set by naming one of its fields; while reconnecting, the next Welcome sends it
  if (welcomed) call.write({ message_id, ...body });
}

const specializations = new Map(); // agent id -> specialization, from presence and syncs

function onWelcome(welcome) {
  const peer = call.getPeer(); // which replica this stream is on
  log(`welcome from hub ${welcome.hub_version} at ${peer}, head seq ${welcome.head_seq}`);
  emit('welcome', { ...welcome, resume_after_seq: lastSeq.toString(), peer, reconnects });
  welcomed = true;
  welcomedAt = Date.now();
  if (ending) return; // SIGTERM while this stream opened: it is ended, nothing may be written
  // After a reconnect: send again, with their ids, what was not answered (the hub answers a
  // repeated id with the original receipt, duplicate: true, and stores nothing twice).
  for (const [message_id, { body }] of pending) call.write({ message_id, ...body });
  if (introduced) return;
  introduced = true;
  send({ share_pattern: { pattern: {
    pattern_id: 'premultiplied_blend', pattern_type: 'graphics_pattern', specialization: SPEC,
    complexity: 0.4, reusability: 0.9, performance_impact: 0.7, confidence: 0.85,
  } } });
  send({ share_code_component: { code_component: {
    component_id: 'blend_span', name: 'blend_span', language: 'c', code: source('blend_span.c'),
    dependencies: ['libc'], test_coverage: 0.8, performance_score: 0.9, specialization: SPEC,
  } } });
  if (PROPOSE_TO) send({ propose_collaboration: { target_agent_id: PROPOSE_TO,
    type: 'COLLABORATION_TYPE_CROSS_SPECIALIZATION', description: 'remote framebuffer updates' } });
}

// Proposed to us: accept, report progress, complete; each step once the previous one's receipt is in.
function collaborate(session_id, partner) {
  const component = {
    component_id: `remote_fb_${session_id}`, name: 'remote_framebuffer',
    component_type: 'collaborative_component', language: 'c',
    specializations: partner && partner !== SPEC ? [SPEC, partner] : [SPEC],
    implementation: source('remote_framebuffer.c'), test_cases: ['test_header', 'test_rows'],
    performance_metrics: { cpu_usage: 0.05, memory_kib: 64, execution_time_seconds: 0.0002 },
    quality_score: 0.85,
  };
  const progress = (value, note) =>
    ({ report_collaboration_progress: { session_id, progress: value, note } });
  send({ accept_collaboration: { session_id } }, () =>
    send(progress(0.5, 'header packing done'), () =>
      send(progress(1.0, 'row packing done and tested'), () =>
        send({ complete_collaboration: { session_id, component } }))));
}

function onEvent(event) {
  // 5. Drop anything at or below the last seq we processed (a replay may overlap what we saw).
  if (BigInt(event.seq) <= lastSeq) return;
  const body = event[event.body]; // oneofs: true names the field that is set
  if (event.body === 'artifact_shared') {
    const item = body[body.content];
    const name = item.name || item.pattern_id;
    log(`${body.contributor_id} shared ${body.kind} ${name} (${body.artifact_id})`);
    emit('artifact_shared', { seq: event.seq, contributor_id: body.contributor_id,
      artifact_id: body.artifact_id, artifact_kind: body.kind, name });
  } else if (event.body === 'collaboration_updated') {
    const c = body.collaboration;
    log(`collaboration ${c.session_id} (${c.initiator_id} -> ${c.target_id}) ${c.state} ${c.progress}`);
    emit('collaboration', { seq: event.seq, session_id: c.session_id, state: c.state,
      initiator_id: c.initiator_id, target_id: c.target_id, progress: c.progress,
      result_artifact_id: c.result_artifact_id });
    if (c.target_id === AGENT_ID && c.state === 'COLLABORATION_STATE_PROPOSED') {
      collaborate(c.session_id, specializations.get(c.initiator_id));
    } else if (c.initiator_id === AGENT_ID && c.state === 'COLLABORATION_STATE_COMPLETED') {
      log(`${c.target_id} completed our collaboration ${c.session_id}: ${c.result_artifact_id}`);
    }
  } else {
    log(`event ${event.seq} ${event.body} from ${event.sender_id || 'the hub'}`);
  }
  lastSeq = BigInt(event.seq);
}

// 4. The hub coalesces what is waiting: one response may carry several receipts, errors and
// events. Handle them in field order: welcome, receipts, errors, events, training sync.
function onResponse(response) {
  if (response.welcome) onWelcome(response.welcome);
  for (const receipt of response.receipts) {
    const { what, then } = pending.get(receipt.message_id) || {};
    pending.delete(receipt.message_id);
    const again = receipt.duplicate ? ' (a duplicate: stored before)' : '';
    log(`receipt for ${what}: seq ${receipt.seq}, id ${receipt.resource_id}${again}`);
    emit('receipt', { what, ...receipt });
    if (then) then(receipt);
  }
  // 6. A refused message gets a RequestError naming each bad field; the stream stays open.
  for (const error of response.errors) {
    const { what } = pending.get(error.message_id) || {};
    pending.delete(error.message_id);
    const fields = error.field_violations.map((v) => `${v.field}: ${v.description}`).join('; ');
    log(`${what} refused: ${error.code_name}: ${error.message} ${fields}`);
    emit('error', { what, ...error });
  }
  for (const event of response.events) onEvent(event);
  // 7. Presence is state, not events: after Welcome the roster (who is online, possibly over
  // several responses, the last with roster_complete), then changes, coalesced.
  if (response.presence) {
    for (const agent of response.presence.online) {
      specializations.set(agent.agent_id, agent.specialization);
      log(`${agent.agent_id} is online (${agent.specialization})`);
    }
    for (const id of response.presence.offline) log(`${id} went offline`);
  }
  if (response.training_sync) {
    const agents = response.training_sync.active_agents;
    for (const agent of agents) specializations.set(agent.agent_id, agent.specialization);
    log(`training sync: online ${agents.map((a) => a.agent_id).join(', ') || 'nobody else'}`);
  }
  saveSeq();
}

// Ending: stop sending with call.end(); the hub answers what we sent, then closes with OK.
let reconnectTimer = null;
function finish(why) {
  if (ending) return;
  ending = true;
  log(`${why}: ending the stream`);
  if (reconnectTimer) { // between streams: nothing to end
    clearTimeout(reconnectTimer);
    saveSeq();
    emit('end', { last_seq: lastSeq.toString(), unanswered: pending.size });
    process.exit(0);
  }
  call.end();
  setTimeout(() => fail('the hub did not close the stream within 5 s'), 5000).unref();
}
setTimeout(() => finish(`ran ${DURATION_S} s`), DURATION_S * 1000);
process.on('SIGINT', () => finish('SIGINT'));
process.on('SIGTERM', () => finish('SIGTERM'));

// 8. A lost stream (the replica died or drains: UNAVAILABLE) is opened again after a jittered,
// growing pause, resuming after our last seq; other failures (UNAUTHENTICATED, PERMISSION_DENIED,
// ABORTED: another connection took over) would fail the same way again, so we stop.
const TRANSIENT = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN,
  grpc.status.RESOURCE_EXHAUSTED]);
const GIVE_UP_MS = 60000;
// A stream that stayed up this long resets the backoff; one lost sooner does not, or a replica
// that welcomes and drops every stream would get a reconnect every 100 ms (as the Python SDK).
const STABLE_STREAM_MS = 10000;
function onStreamError(stream, err) {
  if (stream !== call) return;
  saveSeq();
  welcomed = false;
  emit('stream_error', { code_name: grpc.status[err.code], message: err.details });
  if (ending || !TRANSIENT.has(err.code)) fail(`stream failed: ${grpc.status[err.code]}: ${err.details}`);
  const now = Date.now();
  if (welcomedAt && now - welcomedAt >= STABLE_STREAM_MS) attempt = 0;
  if (welcomedAt || attempt === 0) failingSince = now;
  welcomedAt = 0;
  if (now - failingSince > GIVE_UP_MS) fail(`could not reach the hub for ${GIVE_UP_MS / 1000} s: ${err.details}`);
  const delay = Math.random() * Math.min(5000, 100 * 2 ** attempt);
  attempt += 1;
  log(`stream lost (${grpc.status[err.code]}: ${err.details}); reconnecting in ${Math.round(delay)} ms`);
  reconnectTimer = setTimeout(() => { reconnectTimer = null; reconnects += 1; connect(); }, delay);
}
function onStatus(stream, status) {
  if (stream !== call || status.code !== grpc.status.OK) return; // errors: onStreamError
  saveSeq();
  emit('end', { last_seq: lastSeq.toString(), unanswered: pending.size });
  if (!ending) fail('the hub ended the stream');
  log(`done, last seq ${lastSeq}`);
  process.exit(0);
}

connect();
