// Nanoclaw approval pages: passkey registration and approval (WebAuthn, user verification
// required), served both by the host and by vault-device's own page. The server checks
// everything; this script only carries bytes.
"use strict";

const b64u = {
  enc(buf) {
    let s = "";
    for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  },
  dec(s) {
    const pad = "===".slice((s.length + 3) % 4);
    const bin = atob(s.replace(/-/g, "+").replace(/_/g, "/") + pad);
    return Uint8Array.from(bin, (c) => c.charCodeAt(0));
  },
};

function setStatus(state, text) {
  const el = document.getElementById("status");
  el.dataset.state = state;
  el.textContent = text;
}

async function call(method, path, body) {
  const init = { method, headers: { "content-type": "application/json" } };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const j = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}

// Subscribes this browser to Web Push (best effort: registration goes on without it).
async function subscribePush(key) {
  if (!("serviceWorker" in navigator) || !("PushManager" in window)) return null;
  try {
    const reg = await navigator.serviceWorker.register("/sw.js");
    await navigator.serviceWorker.ready;
    if ((await Notification.requestPermission()) !== "granted") return null;
    const sub = await reg.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: b64u.dec(key),
    });
    return sub.toJSON();
  } catch (e) {
    console.warn("push subscription failed", e);
    return null;
  }
}

// Registers a passkey with the one-time token in the URL fragment. Resolves to a status word.
async function nanoclawRegister() {
  try {
    setStatus("busy", "Waiting for your passkey...");
    const o = await call("POST", "/api/register/begin", { token: location.hash.slice(1) });
    const cred = await navigator.credentials.create({
      publicKey: {
        challenge: b64u.dec(o.challenge),
        rp: { id: o.rp_id, name: "Nanoclaw" },
        user: { id: b64u.dec(o.user_id), name: o.user_name, displayName: "Nanoclaw owner" },
        pubKeyCredParams: [{ type: "public-key", alg: -7 }],
        authenticatorSelection: { userVerification: "required", residentKey: "preferred" },
        attestation: "none",
        excludeCredentials: o.exclude.map((id) => ({ type: "public-key", id: b64u.dec(id) })),
        timeout: 60000,
      },
    });
    const push = o.push_key ? await subscribePush(o.push_key) : null;
    const done = await call("POST", "/api/register/finish", {
      challenge: o.challenge,
      attestation_object: b64u.enc(cred.response.attestationObject),
      client_data_json: b64u.enc(cred.response.clientDataJSON),
      push,
    });
    setStatus("registered", "Passkey registered." +
      (done.push_error ? " Notifications are off: " + done.push_error : push ? " Notifications are on." : ""));
    return "registered";
  } catch (e) {
    setStatus("error", "Registration failed: " + e.message);
    return "error: " + e.message;
  }
}

function approvalId() {
  return decodeURIComponent(location.pathname.split("/").pop());
}

function describe(action) {
  switch (action.type) {
    case "tool_call": return "call tool " + action.tool + " on server " + action.server;
    case "spawn": return "spawn an agent with profile " + action.profile;
    case "credential": return "use credential " + action.name + " for " + action.target_host;
    default: return JSON.stringify(action);
  }
}

async function nanoclawShow() {
  try {
    const v = await call("GET", "/api/approvals/" + encodeURIComponent(approvalId()));
    const r = v.request;
    const set = (id, text) => { document.getElementById(id).textContent = text; };
    set("agent", r.agent);
    set("vm", r.vm_id);
    set("profile", r.profile);
    set("action", describe(r.action));
    set("reason", r.reason);
    set("rule", r.rule);
    set("expires", new Date(r.expires_unix_ms).toLocaleString());
    set("arguments", r.arguments);
    setStatus("pending", "Waiting for your decision.");
    return v;
  } catch (e) {
    setStatus("error", e.message);
    return null;
  }
}

// Approves the shown request with a passkey. Resolves to a status word.
async function nanoclawApprove() {
  try {
    const v = await nanoclawShow();
    if (!v) throw new Error("this request is no longer pending");
    setStatus("busy", "Waiting for your passkey...");
    const cred = await navigator.credentials.get({
      publicKey: {
        challenge: b64u.dec(v.challenge),
        rpId: v.rp_id,
        allowCredentials: v.credential_ids.map((id) => ({ type: "public-key", id: b64u.dec(id) })),
        userVerification: "required",
        timeout: 60000,
      },
    });
    const assertion = {
      credential_id: b64u.enc(cred.rawId),
      authenticator_data: b64u.enc(cred.response.authenticatorData),
      client_data_json: b64u.enc(cred.response.clientDataJSON),
      signature: b64u.enc(cred.response.signature),
    };
    // Kept for inspection (the browser test replays it to check that replays are refused).
    window.nanoclawLastAssertion = assertion;
    const a = await call("POST", "/api/approvals/" + encodeURIComponent(approvalId()) + "/approve", assertion);
    setStatus("approved", "Approved (" + a.approval_id + ").");
    return "approved";
  } catch (e) {
    setStatus("error", "Approval failed: " + e.message);
    return "error: " + e.message;
  }
}

async function nanoclawDeny() {
  try {
    await call("POST", "/api/approvals/" + encodeURIComponent(approvalId()) + "/deny");
    setStatus("denied", "Denied.");
    return "denied";
  } catch (e) {
    setStatus("error", e.message);
    return "error: " + e.message;
  }
}

// The device's page of pending asks: one link per ask to its approval page. Resolves to the
// number of asks shown, or null on an error.
async function nanoclawList() {
  try {
    const list = await call("GET", "/api/approvals");
    const ul = document.getElementById("pending");
    ul.replaceChildren();
    for (const v of list) {
      const r = v.request;
      const a = document.createElement("a");
      a.href = "/approve/" + encodeURIComponent(r.id);
      a.textContent = describe(r.action) + " (VM " + r.vm_id + "), until " +
        new Date(r.expires_unix_ms).toLocaleString();
      const li = document.createElement("li");
      li.appendChild(a);
      ul.appendChild(li);
    }
    if (list.length) setStatus("pending", list.length + " request(s) wait for your decision.");
    else setStatus("empty", "Nothing waits for your decision.");
    return list.length;
  } catch (e) {
    setStatus("error", e.message);
    return null;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "register") {
    document.getElementById("register").addEventListener("click", nanoclawRegister);
  } else if (document.body.dataset.page === "list") {
    document.getElementById("refresh").addEventListener("click", nanoclawList);
    nanoclawList();
  } else {
    document.getElementById("approve").addEventListener("click", nanoclawApprove);
    document.getElementById("deny").addEventListener("click", nanoclawDeny);
    nanoclawShow();
  }
});
