// Proof with real clients: pusher-js 8 (its Node build) and the official Pusher Node server
// SDK (`pusher` 5) against a running Switchboard, both used exactly as an application uses
// them. Run by integration/tests/pusher_js.rs; can be run by hand:
//
//   SWITCHBOARD_PORT=6001 SWITCHBOARD_APP_ID=1001 SWITCHBOARD_APP_KEY=... \
//   SWITCHBOARD_APP_SECRET=... node pusher_clients_test.mjs
//
// Env: SWITCHBOARD_HOST (default 127.0.0.1), SWITCHBOARD_PORT, SWITCHBOARD_APP_ID,
// SWITCHBOARD_APP_KEY, SWITCHBOARD_APP_SECRET (all required but the host),
// PUSHER_TEST_TIMEOUT_MS (default 60000), PUSHER_TEST_DEBUG=1 (print every frame received).
//
// Prints `ok N - check (detail) [ms]` per check; on the first failure prints `not ok N - check`,
// the reason, the last frames each client received, and exits 1. Exits 2 on the overall
// timeout. Everything goes to stdout, in order.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import http from "node:http";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const PusherClient = require("pusher-js"); // package.json "main": the Node build
const PusherServer = require("pusher");

// ------------------------------------------------------------------------ configuration

function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === "") {
    if (fallback !== undefined) return fallback;
    console.log(`missing environment variable ${name}`);
    process.exit(1);
  }
  return v;
}

const HOST = env("SWITCHBOARD_HOST", "127.0.0.1");
const PORT = Number(env("SWITCHBOARD_PORT"));
const APP_ID = env("SWITCHBOARD_APP_ID");
const KEY = env("SWITCHBOARD_APP_KEY");
const SECRET = env("SWITCHBOARD_APP_SECRET");
const TIMEOUT_MS = Number(env("PUSHER_TEST_TIMEOUT_MS", "60000"));
const DEBUG = env("PUSHER_TEST_DEBUG", "") === "1";
/** How long a check waits for one expected event. */
const WAIT_MS = 10000;
/** How long a check watches for something that must not happen. */
const QUIET_MS = 500;

const started = Date.now();
const overall = setTimeout(() => {
  console.log(`not ok - overall timeout: the script ran longer than ${TIMEOUT_MS} ms`);
  dumpFrames();
  process.exit(2);
}, TIMEOUT_MS);

// The server SDK, as an app configures it for a self-hosted Pusher-compatible server. The
// 32-byte master key serves end-to-end encrypted channels (the server never sees it).
const encryptionMasterKeyBase64 = randomBytes(32).toString("base64");
const sdk = new PusherServer({
  appId: APP_ID,
  key: KEY,
  secret: SECRET,
  host: HOST,
  port: PORT,
  useTLS: false,
  timeout: WAIT_MS,
  encryptionMasterKeyBase64,
});

// ------------------------------------------------------------------------ reporting

let checkNo = 0;
const clients = new Map(); // name -> { pusher, frames: [] }

function dumpFrames() {
  for (const [name, c] of clients) {
    const last = c.frames.slice(-15);
    console.log(`--- last ${last.length} of ${c.frames.length} frames received by ${name}:`);
    for (const f of last) console.log(`    ${JSON.stringify(f)}`);
  }
}

async function check(name, fn) {
  checkNo += 1;
  const t0 = Date.now();
  try {
    const detail = await fn();
    const ms = Date.now() - t0;
    console.log(`ok ${checkNo} - ${name}${detail ? ` (${detail})` : ""} [${ms} ms]`);
  } catch (e) {
    console.log(`not ok ${checkNo} - ${name}`);
    console.log(`    ${e && e.stack ? e.stack : e}`);
    if (e && e.body !== undefined) console.log(`    response status ${e.status}: ${e.body}`);
    dumpFrames();
    process.exit(1);
  }
}

// ------------------------------------------------------------------------ helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const uniq = (prefix) => `${prefix}-${randomBytes(4).toString("hex")}`;

/** Resolves with the callback's arguments the first time `emitter` fires `event`. */
function once(emitter, event, what, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.unbind(event, handler);
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    function handler(...args) {
      clearTimeout(timer);
      emitter.unbind(event, handler);
      resolve(args);
    }
    emitter.bind(event, handler);
  });
}

/** Polls `pred` until it holds. */
async function until(pred, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

/**
 * A pusher-js client configured as an app configures it for a self-hosted server. `user`
 * names the user the auth endpoint signs for (sent as an auth parameter).
 */
function newClient(name, user, extra = {}) {
  const pusher = new PusherClient(KEY, {
    cluster: "mt1", // required by pusher-js 8; unused when wsHost is set
    wsHost: HOST,
    wsPort: PORT,
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      endpoint: `${authBase}/pusher/auth`,
      transport: "ajax",
      params: user ? { user_id: user.id, user_name: user.name } : {},
    },
    userAuthentication: {
      endpoint: `${authBase}/pusher/user-auth`,
      transport: "ajax",
      params: user ? { user_id: user.id, user_name: user.name } : {},
    },
    ...extra,
  });
  const c = { name, pusher, frames: [], errors: [], states: [] };
  // Every frame pusher-js decoded, for assertions on the wire and for failure reports.
  pusher.connection.bind("message", (m) => {
    c.frames.push(m);
    if (DEBUG) console.log(`    [${name}] ${JSON.stringify(m)}`);
  });
  pusher.connection.bind("error", (e) => c.errors.push(e));
  pusher.connection.bind("state_change", (s) => c.states.push(s.current));
  clients.set(name, c);
  return c;
}

async function connected(c) {
  if (c.pusher.connection.state !== "connected") {
    await once(c.pusher.connection, "connected", `${c.name} to connect`);
  }
  return c.pusher.connection.socket_id;
}

/** Subscribes and waits for `pusher:subscription_succeeded`; returns its argument. */
async function subscribe(c, channelName) {
  const channel = c.pusher.subscribe(channelName);
  const failed = once(channel, "pusher:subscription_error", "", WAIT_MS).then(
    ([e]) => {
      throw new Error(`${c.name}: subscription to ${channelName} failed: ${JSON.stringify(e)}`);
    },
    () => new Promise(() => {}),
  );
  const [data] = await Promise.race([
    once(channel, "pusher:subscription_succeeded", `${c.name}'s subscription to ${channelName}`),
    failed,
  ]);
  return { channel, data };
}

/** Events a client's channel handed to the application: [{event, data, metadata}]. */
function record(channel) {
  const seen = [];
  channel.bind_global((event, data) => {
    if (!event.startsWith("pusher:")) seen.push({ event, data });
  });
  return seen;
}

function findEvent(seen, event) {
  return seen.find((e) => e.event === event);
}

async function received(seen, event, who) {
  return until(() => findEvent(seen, event), `${who} to receive '${event}'`);
}

/** `pusher.get` / `pusher.post` answer as parsed JSON, with the status checked. */
async function jsonOf(promise, status = 200) {
  const res = await promise;
  assert.equal(res.status, status, `HTTP status of ${res.url}`);
  return res.json();
}

/** An HTTP error of the SDK carries the response body: surface it in the failure. */
async function sdkCall(what, promise) {
  try {
    return await promise;
  } catch (e) {
    const err = new Error(`${what}: ${e.message}${e.body ? ` — body: ${e.body}` : ""}`);
    err.status = e.status;
    throw err;
  }
}

// ------------------------------------------------------------------------ auth endpoint

// The app's own auth endpoint, written as Pusher's docs show: the SDK signs, the app decides
// who the user is (here the client names itself through an auth parameter).
const authCalls = { channel: [], user: [] };
const authServer = http.createServer((req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    const form = new URLSearchParams(body);
    const socketId = form.get("socket_id");
    const userId = form.get("user_id");
    const reply = (status, obj) => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(obj));
    };
    try {
      if (req.method === "POST" && req.url === "/pusher/auth") {
        const channel = form.get("channel_name");
        authCalls.channel.push({ socketId, channel, userId });
        if (channel.startsWith("private-refused-")) return reply(403, { error: "no" });
        const presenceData = channel.startsWith("presence-")
          ? { user_id: userId, user_info: { name: form.get("user_name") } }
          : undefined;
        return reply(200, sdk.authorizeChannel(socketId, channel, presenceData));
      }
      if (req.method === "POST" && req.url === "/pusher/user-auth") {
        authCalls.user.push({ socketId, userId });
        return reply(200, sdk.authenticateUser(socketId, { id: userId, user_info: { name: form.get("user_name") } }));
      }
      reply(404, { error: "not found" });
    } catch (e) {
      reply(500, { error: String(e) });
    }
  });
});
await new Promise((r) => authServer.listen(0, "127.0.0.1", r));
const authBase = `http://127.0.0.1:${authServer.address().port}`;

// ------------------------------------------------------------------------ the checks

console.log(
  `# pusher-js ${require("pusher-js/package.json").version} and pusher (server SDK) ${require("pusher/package.json").version} ` +
    `against ${HOST}:${PORT}, app ${APP_ID}; auth endpoint ${authBase}`,
);

await check("SDK-signed GET /settings and PATCH /settings enable client events", async () => {
  const before = await jsonOf(sdkCall("GET /settings", sdk.get({ path: "/settings" })));
  assert.equal(typeof before, "object");
  // The SDK has no PATCH helper; its public createSignedQueryString signs any method.
  const path = `/apps/${APP_ID}/settings`;
  const body = JSON.stringify({ enable_client_messages: true });
  const qs = sdk.createSignedQueryString({ method: "PATCH", path, body });
  const res = await fetch(`http://${HOST}:${PORT}${path}?${qs}`, {
    method: "PATCH",
    headers: { "content-type": "application/json" },
    body,
  });
  const text = await res.text();
  assert.equal(res.status, 200, `PATCH /settings answered ${res.status}: ${text}`);
  const after = JSON.parse(text);
  assert.equal(after.enable_client_messages, true, text);
  return `enable_client_messages ${before.enable_client_messages} -> ${after.enable_client_messages}`;
});

const alice = newClient("alice", { id: "alice", name: "Alice" });
const bob = newClient("bob", { id: "bob", name: "Bob" });

await check("pusher-js connects (protocol 7, ws transport) and gets a socket id", async () => {
  const [a, b] = await Promise.all([connected(alice), connected(bob)]);
  for (const id of [a, b]) assert.match(id, /^\d+\.\d+$/, `socket id ${id}`);
  assert.notEqual(a, b);
  // min(pusher-js's 120 s, the server's activity_timeout from pusher:connection_established)
  const activity = alice.pusher.connection.activityTimeout;
  assert.ok(activity > 0 && activity <= 120000, `activityTimeout ${activity}`);
  return `alice ${a}, bob ${b}, activityTimeout ${activity} ms`;
});

const pub = uniq("public-room");
const priv = uniq("private-room");
const enc = uniq("private-encrypted-room");
const pres = uniq("presence-room");
let alicePub, bobPub, alicePriv, bobPriv, alicePres, bobPres;

await check("public channel: pusher:subscription_succeeded on both clients", async () => {
  const [a, b] = await Promise.all([subscribe(alice, pub), subscribe(bob, pub)]);
  alicePub = record(a.channel);
  bobPub = record(b.channel);
  return pub;
});

await check("SDK trigger: object data arrives as the object, a string as the string", async () => {
  const payload = { text: "hello", n: 42, nested: { ok: true, list: [1, "two", null] } };
  const res = await sdkCall("trigger", sdk.trigger(pub, "greeting", payload));
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), {});
  await sdkCall("trigger", sdk.trigger(pub, "plain", "just text, not JSON"));
  for (const [who, seen] of [["alice", alicePub], ["bob", bobPub]]) {
    const got = await received(seen, "greeting", who);
    assert.deepEqual(got.data, payload);
    const plain = await received(seen, "plain", who);
    assert.equal(plain.data, "just text, not JSON");
  }
  return "both clients, answer {}";
});

await check("SDK trigger with info=subscription_count answers the channel's count", async () => {
  const res = await sdkCall(
    "trigger with info",
    sdk.trigger(pub, "counted", { x: 1 }, { info: "subscription_count" }),
  );
  const body = await res.json();
  assert.equal(body.channels?.[pub]?.subscription_count, 2, JSON.stringify(body));
  await received(alicePub, "counted", "alice");
  return JSON.stringify(body.channels[pub]);
});

await check("private channel: authorized through the app's endpoint (SDK authorizeChannel)", async () => {
  const calls = authCalls.channel.length;
  const [a, b] = await Promise.all([subscribe(alice, priv), subscribe(bob, priv)]);
  alicePriv = record(a.channel);
  bobPriv = record(b.channel);
  const made = authCalls.channel.slice(calls);
  assert.equal(made.length, 2, `auth endpoint calls: ${JSON.stringify(made)}`);
  assert.deepEqual(
    made.map((c) => c.socketId).sort(),
    [alice.pusher.connection.socket_id, bob.pusher.connection.socket_id].sort(),
  );
  return priv;
});

await check("private channel: a forged signature is refused (no subscription_succeeded)", async () => {
  const mallory = newClient("mallory", null, {
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, cb) => {
        const real = sdk.authorizeChannel(socketId, channelName);
        cb(null, { auth: real.auth.replace(/:.*/, ":" + "0".repeat(64)) });
      },
    },
  });
  await connected(mallory);
  const channel = mallory.pusher.subscribe(priv);
  let ok = false;
  channel.bind("pusher:subscription_succeeded", () => (ok = true));
  const err = await until(
    () => mallory.frames.find((f) => f.event === "pusher:error"),
    "a pusher:error for the forged signature",
  );
  await sleep(QUIET_MS);
  assert.equal(ok, false, "a forged signature must not subscribe");
  await sdkCall("trigger", sdk.trigger(priv, "secret", { s: 1 }));
  await received(alicePriv, "secret", "alice");
  await sleep(QUIET_MS);
  assert.ok(
    !mallory.frames.some((f) => f.event === "secret"),
    "the refused socket received a private event",
  );
  mallory.pusher.disconnect();
  return `pusher:error ${JSON.stringify(err.data)}`;
});

await check("private channel: the app's endpoint refusing (403) gives subscription_error", async () => {
  const channel = alice.pusher.subscribe(uniq("private-refused"));
  const [e] = await once(channel, "pusher:subscription_error", "pusher:subscription_error");
  assert.equal(e.status, 403, JSON.stringify(e));
  alice.pusher.unsubscribe(channel.name);
  return `status ${e.status}`;
});

await check("SDK trigger to several channels [public, private] reaches both", async () => {
  await sdkCall("trigger", sdk.trigger([pub, priv], "multi", { both: true }));
  assert.deepEqual((await received(alicePub, "multi", "alice")).data, { both: true });
  assert.deepEqual((await received(alicePriv, "multi", "alice")).data, { both: true });
  assert.deepEqual((await received(bobPriv, "multi", "bob")).data, { both: true });
  return "";
});

await check("SDK triggerBatch delivers each event to its channel", async () => {
  const res = await sdkCall(
    "triggerBatch",
    sdk.triggerBatch([
      { channel: pub, name: "batch-1", data: { n: 1 } },
      { channel: priv, name: "batch-2", data: { n: 2 } },
      { channel: pub, name: "batch-3", data: "three" },
    ]),
  );
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.deepEqual((await received(bobPub, "batch-1", "bob")).data, { n: 1 });
  assert.deepEqual((await received(bobPriv, "batch-2", "bob")).data, { n: 2 });
  assert.equal((await received(bobPub, "batch-3", "bob")).data, "three");
  const order = bobPub.filter((e) => e.event.startsWith("batch-")).map((e) => e.event);
  assert.deepEqual(order, ["batch-1", "batch-3"], "batch order on one channel");
  return `answer ${JSON.stringify(body)}`;
});

await check("SDK triggerBatch with info answers a count per event", async () => {
  const res = await sdkCall(
    "triggerBatch with info",
    sdk.triggerBatch([
      { channel: pub, name: "batch-info", data: {}, info: "subscription_count" },
      { channel: priv, name: "batch-info", data: {}, info: "subscription_count" },
    ]),
  );
  const body = await res.json();
  assert.ok(Array.isArray(body.batch) && body.batch.length === 2, JSON.stringify(body));
  assert.equal(body.batch[0].subscription_count, 2, JSON.stringify(body));
  assert.equal(body.batch[1].subscription_count, 2, JSON.stringify(body));
  return JSON.stringify(body);
});

await check("SDK trigger with socket_id excludes that client only", async () => {
  await sdkCall(
    "trigger",
    sdk.trigger(pub, "not-for-alice", { x: 1 }, { socket_id: alice.pusher.connection.socket_id }),
  );
  await sdkCall("trigger", sdk.trigger(pub, "fence", { x: 2 }));
  await received(bobPub, "not-for-alice", "bob");
  await received(alicePub, "fence", "alice");
  assert.equal(findEvent(alicePub, "not-for-alice"), undefined, "alice got the excluded event");
  return "";
});

await check("private-encrypted channel: SDK-encrypted event decrypted by pusher-js", async () => {
  const { channel } = await subscribe(alice, enc);
  const seen = record(channel);
  const secret = { card: "4111", note: "end-to-end" };
  await sdkCall("trigger", sdk.trigger(enc, "sealed", secret));
  const got = await received(seen, "sealed", "alice");
  assert.deepEqual(got.data, secret);
  const wire = alice.frames.find((f) => f.event === "sealed");
  assert.ok(wire.data.ciphertext && wire.data.nonce, "the server relayed ciphertext only");
  return "relayed as {nonce, ciphertext}";
});

await check("presence channel: subscription_succeeded with members.count and members.me", async () => {
  const { channel, data: members } = await subscribe(alice, pres);
  alicePres = channel;
  assert.equal(members.count, 1);
  assert.equal(members.me.id, "alice");
  assert.deepEqual(members.me.info, { name: "Alice" });
  return `count ${members.count}, me ${JSON.stringify(members.me)}`;
});

await check("presence channel: a second member joining fires pusher:member_added", async () => {
  const added = once(alicePres, "pusher:member_added", "pusher:member_added on alice");
  const { channel, data: members } = await subscribe(bob, pres);
  bobPres = channel;
  const [member] = await added;
  assert.equal(member.id, "bob");
  assert.deepEqual(member.info, { name: "Bob" });
  assert.equal(alicePres.members.count, 2);
  assert.equal(members.count, 2);
  assert.deepEqual(members.get("alice")?.info, { name: "Alice" });
  const ids = [];
  members.each((m) => ids.push(m.id));
  assert.deepEqual(ids.sort(), ["alice", "bob"]);
  return `alice saw ${JSON.stringify(member)}; bob sees ${ids.join(", ")}`;
});

await check("client event client-typing on a private channel reaches the other client", async () => {
  const payload = { typing: true, who: "alice" };
  assert.equal(alice.pusher.channel(priv).trigger("client-typing", payload), true);
  const got = await received(bobPriv, "client-typing", "bob");
  assert.deepEqual(got.data, payload);
  // Never echoed to the sender: a later server event arrives and nothing before it.
  await sdkCall("trigger", sdk.trigger(priv, "after-typing", {}));
  await received(alicePriv, "after-typing", "alice");
  assert.equal(findEvent(alicePriv, "client-typing"), undefined, "echoed to the sender");
  const wire = bob.frames.find((f) => f.event === "client-typing");
  return `wire ${JSON.stringify(wire)}`;
});

await check("client event on a presence channel carries the sender's user_id", async () => {
  const got = once(alicePres, "client-wave", "client-wave on alice");
  assert.equal(bobPres.trigger("client-wave", { hi: 1 }), true);
  const [data, metadata] = await got;
  assert.deepEqual(data, { hi: 1 });
  assert.equal(metadata?.user_id, "bob", `metadata ${JSON.stringify(metadata)}`);
  return `metadata ${JSON.stringify(metadata)}`;
});

await check("client event on a public channel is refused with pusher:error", async () => {
  const errors = alice.frames.filter((f) => f.event === "pusher:error").length;
  alice.pusher.channel(pub).trigger("client-nope", { x: 1 });
  const err = await until(
    () => alice.frames.filter((f) => f.event === "pusher:error")[errors],
    "pusher:error",
  );
  await sdkCall("trigger", sdk.trigger(pub, "after-nope", {}));
  await received(bobPub, "after-nope", "bob");
  assert.equal(findEvent(bobPub, "client-nope"), undefined, "relayed on a public channel");
  assert.equal(alice.pusher.connection.state, "connected");
  return JSON.stringify(err.data);
});

await check("SDK GET /channels?filter_by_prefix=presence-&info=user_count", async () => {
  const body = await jsonOf(
    sdkCall(
      "GET /channels",
      sdk.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } }),
    ),
  );
  assert.deepEqual(Object.keys(body), ["channels"], JSON.stringify(body));
  assert.deepEqual(body.channels, { [pres]: { user_count: 2 } });
  // As Pusher: user_count without a presence- filter is a 400, which the SDK rejects with.
  const refused = await sdk.get({ path: "/channels", params: { info: "user_count" } }).then(
    (res) => `answered ${res.status}`,
    (e) => e,
  );
  assert.equal(refused.status, 400, `user_count without the presence- filter: ${refused}`);
  return `${JSON.stringify(body)}; without the filter: 400 ${refused.body}`;
});

await check("SDK GET /channels lists every occupied channel", async () => {
  const body = await jsonOf(sdkCall("GET /channels", sdk.get({ path: "/channels" })));
  for (const c of [pub, priv, enc, pres]) {
    assert.deepEqual(body.channels?.[c], {}, `${c} in ${JSON.stringify(body)}`);
  }
  const onlyPrivate = await jsonOf(
    sdkCall("GET /channels", sdk.get({ path: "/channels", params: { filter_by_prefix: "private-" } })),
  );
  assert.deepEqual(Object.keys(onlyPrivate.channels).sort(), [enc, priv].sort());
  return `${Object.keys(body.channels).length} channels`;
});

await check("SDK GET /channels/{public}?info=subscription_count", async () => {
  const body = await jsonOf(
    sdkCall(
      "GET /channels/{c}",
      sdk.get({ path: `/channels/${pub}`, params: { info: "subscription_count" } }),
    ),
  );
  assert.deepEqual(body, { occupied: true, subscription_count: 2 });
  const empty = await jsonOf(sdkCall("GET /channels/{c}", sdk.get({ path: `/channels/${uniq("nobody")}` })));
  assert.deepEqual(empty, { occupied: false });
  return JSON.stringify(body);
});

await check("SDK GET /channels/{presence}?info=user_count,subscription_count", async () => {
  const body = await jsonOf(
    sdkCall(
      "GET /channels/{presence}",
      sdk.get({ path: `/channels/${pres}`, params: { info: "user_count,subscription_count" } }),
    ),
  );
  assert.deepEqual(body, { occupied: true, user_count: 2, subscription_count: 2 });
  return JSON.stringify(body);
});

await check("SDK GET /channels/{presence}/users", async () => {
  const body = await jsonOf(sdkCall("GET users", sdk.get({ path: `/channels/${pres}/users` })));
  assert.ok(Array.isArray(body.users), JSON.stringify(body));
  assert.deepEqual(
    body.users.map((u) => u.id).sort(),
    ["alice", "bob"],
    JSON.stringify(body),
  );
  return JSON.stringify(body);
});

await check("presence channel: a member disconnecting fires pusher:member_removed", async () => {
  const removed = once(alicePres, "pusher:member_removed", "pusher:member_removed on alice");
  bob.pusher.disconnect();
  const [member] = await removed;
  assert.equal(member.id, "bob");
  assert.equal(alicePres.members.count, 1);
  const users = await jsonOf(sdkCall("GET users", sdk.get({ path: `/channels/${pres}/users` })));
  assert.deepEqual(users, { users: [{ id: "alice" }] });
  const info = await jsonOf(
    sdkCall("GET /channels/{c}", sdk.get({ path: `/channels/${pub}`, params: { info: "subscription_count" } })),
  );
  assert.deepEqual(info, { occupied: true, subscription_count: 1 });
  return `removed ${JSON.stringify(member)}; users ${JSON.stringify(users)}`;
});

await check("presence channel: one user on two sockets is one member; unsubscribe removes it", async () => {
  const frank1 = newClient("frank1", { id: "frank", name: "Frank" });
  const frank2 = newClient("frank2", { id: "frank", name: "Frank" });
  await Promise.all([connected(frank1), connected(frank2)]);
  const seen = [];
  const onAdd = (m) => seen.push(`added ${m.id}`);
  const onRemove = (m) => seen.push(`removed ${m.id}`);
  alicePres.bind("pusher:member_added", onAdd);
  alicePres.bind("pusher:member_removed", onRemove);
  try {
    await subscribe(frank1, pres);
    const { data: members } = await subscribe(frank2, pres);
    assert.equal(members.count, 2, "alice and frank");
    await until(() => seen.length >= 1, "member_added for frank");
    // The second socket leaves by pusher:unsubscribe: frank is still there on the first.
    frank2.pusher.unsubscribe(pres);
    await sdkCall("trigger", sdk.trigger(pres, "fence-frank", {}));
    await until(() => frank1.frames.some((f) => f.event === "fence-frank"), "frank1 to get the fence");
    await sleep(QUIET_MS);
    assert.deepEqual(seen, ["added frank"], "one member_added, no member_removed yet");
    const users = await jsonOf(sdkCall("GET users", sdk.get({ path: `/channels/${pres}/users` })));
    assert.deepEqual(users.users.map((u) => u.id).sort(), ["alice", "frank"]);
    frank1.pusher.unsubscribe(pres);
    await until(() => seen.length >= 2, "member_removed for frank");
    assert.deepEqual(seen, ["added frank", "removed frank"]);
    assert.equal(alicePres.members.count, 1);
  } finally {
    alicePres.unbind("pusher:member_added", onAdd);
    alicePres.unbind("pusher:member_removed", onRemove);
    frank1.pusher.disconnect();
    frank2.pusher.disconnect();
  }
  return seen.join(", ");
});

const carol = newClient("carol", { id: "carol", name: "Carol" });

await check("pusher-js signin() through the app's endpoint (SDK authenticateUser)", async () => {
  await connected(carol);
  carol.pusher.signin();
  await until(() => carol.pusher.user.signinDonePromise, "signin to start");
  await Promise.race([
    carol.pusher.user.signinDonePromise,
    sleep(WAIT_MS).then(() => {
      throw new Error("signin did not complete");
    }),
  ]);
  assert.equal(carol.pusher.user.user_data?.id, "carol", JSON.stringify(carol.pusher.user.user_data));
  assert.equal(authCalls.user.length, 1);
  const ok = carol.frames.find((f) => f.event === "pusher:signin_success");
  assert.ok(ok, "pusher:signin_success was received");
  return `user_data ${JSON.stringify(carol.pusher.user.user_data)}`;
});

await check("SDK sendToUser reaches the signed-in user (#server-to-user- channel)", async () => {
  await until(() => carol.pusher.user.serverToUserChannel?.subscribed, "the #server-to-user-carol subscription");
  const got = once(carol.pusher.user, "notice", "carol.user 'notice'");
  await sdkCall("sendToUser", sdk.sendToUser("carol", "notice", { msg: "for carol" }));
  const [data] = await got;
  assert.deepEqual(data, { msg: "for carol" });
  return "";
});

await check("SDK terminateUserConnections closes the user's sockets (4009), others stay", async () => {
  const res = await sdkCall("terminateUserConnections", sdk.terminateUserConnections("carol"));
  assert.equal(res.status, 200);
  const body = await res.json();
  await until(() => carol.pusher.connection.state === "disconnected", "carol to be disconnected");
  const codes = carol.errors.map((e) => e?.error?.data?.code ?? e?.data?.code).filter(Boolean);
  assert.ok(codes.includes(4009), `errors seen by carol: ${JSON.stringify(carol.errors)}`);
  // pusher-js treats 4000-4099 as "refused": it must not reconnect.
  await sleep(QUIET_MS);
  assert.equal(carol.pusher.connection.state, "disconnected");
  assert.equal(alice.pusher.connection.state, "connected");
  await sdkCall("trigger", sdk.trigger(pub, "still-here", {}));
  await received(alicePub, "still-here", "alice");
  return `answer ${JSON.stringify(body)}; carol's states ${carol.states.join(" > ")}`;
});

await check("keepalive: pusher-js pings an idle connection and the server's pongs keep it up", async () => {
  // activityTimeout and pongTimeout shortened so pusher-js's own keepalive runs several times.
  const idle = newClient("idle", null, { activityTimeout: 300, pongTimeout: 1000 });
  await connected(idle);
  const socketId = idle.pusher.connection.socket_id;
  await sleep(1600);
  const pongs = idle.frames.filter((f) => f.event === "pusher:pong").length;
  assert.ok(pongs >= 2, `pongs received: ${pongs}`);
  assert.equal(idle.pusher.connection.state, "connected");
  assert.equal(idle.pusher.connection.socket_id, socketId, "the connection was never replaced");
  assert.deepEqual(idle.states.filter((st) => st !== "connecting"), ["connected"], "states");
  idle.pusher.disconnect();
  return `${pongs} pongs in 1.6 s`;
});

// Last, so that a failure here leaves every other check reported. pusher-js itself refuses
// `#` names, so the intruder sends the raw frame any WebSocket client can send.
await check("a socket not signed in as the user cannot subscribe to #server-to-user-<id>", async () => {
  const dave = newClient("dave", { id: "dave", name: "Dave" });
  await connected(dave);
  dave.pusher.signin();
  await until(() => dave.pusher.user.user_data?.id === "dave", "dave's signin");
  const eve = newClient("eve", null);
  await connected(eve);
  for (const c of [eve, dave]) {
    c.pusher.send_event("pusher:subscribe", { channel: "#server-to-user-alice" });
  }
  await until(
    () => [eve, dave].every((c) => c.frames.some((f) => f.event === "pusher:error" || f.channel === "#server-to-user-alice")),
    "an answer to both subscriptions",
  );
  await sdkCall("sendToUser", sdk.sendToUser("alice", "for-alice-only", { msg: "private" }));
  await sdkCall("trigger", sdk.trigger(pub, "after-user-notice", {}));
  await received(alicePub, "after-user-notice", "alice");
  await sleep(QUIET_MS);
  const leaks = [eve, dave].map((c) => ({
    who: c.name,
    subscribed: c.frames.some(
      (f) => f.event === "pusher_internal:subscription_succeeded" && f.channel === "#server-to-user-alice",
    ),
    received: c.frames.some((f) => f.event === "for-alice-only"),
  }));
  for (const c of [eve, dave]) c.pusher.disconnect();
  assert.ok(
    leaks.every((l) => !l.subscribed && !l.received),
    `another user's #server-to-user- channel was open to: ${JSON.stringify(leaks)}`,
  );
  return "refused for an anonymous socket and for another signed-in user";
});

// ------------------------------------------------------------------------ done

for (const c of clients.values()) c.pusher.disconnect();
authServer.close();
clearTimeout(overall);
console.log(`# all ${checkNo} checks passed in ${Date.now() - started} ms`);
process.exit(0);
