// The `fetch` a ChatKit custom-mode page hands to ChatKit JS so that every call
// carries a gateway client secret:
//
//   const fetch = createGatewayFetch({ getSession: () => mySessionEndpoint() });
//   chatkit.setOptions({ api: { url: GATEWAY + "/chatkit", domainKey, fetch } });
//
// `getSession()` resolves to `{client_secret, expires_at}` (unix seconds), what
// the app backend got from `client.beta.chatkit.sessions.create`. Custom mode
// has no secret-refresh hook of its own, so the renewal lives here: a secret is
// renewed `renewBeforeSeconds` before it expires and, should the gateway still
// answer 401 `client_secret_expired` (a slow clock, a sleeping laptop), renewed
// and the request retried once. Concurrent calls share one renewal.
(function (global) {
  "use strict";

  function createGatewayFetch(options) {
    const getSession = options.getSession;
    const renewBeforeSeconds = options.renewBeforeSeconds ?? 30;
    const baseFetch = options.fetch ?? global.fetch.bind(global);
    const now = options.now ?? (() => Date.now() / 1000);
    let current = null; // a promise of the session in use

    function renew() {
      const pending = Promise.resolve().then(getSession);
      current = pending;
      // A failed renewal must not stick: the next call tries again.
      pending.catch(() => {
        if (current === pending) current = null;
      });
      return pending;
    }

    async function activeSession() {
      const pending = current ?? renew();
      const active = await pending;
      if (active.expires_at - renewBeforeSeconds > now()) return active;
      // Due for renewal; unless another call has started one meanwhile.
      return current !== null && current !== pending ? current : renew();
    }

    // After `used` was refused as expired: the session another call has already
    // renewed to, if any, else a new one (so N refused calls make one renewal).
    async function renewAfter(used) {
      const pending = current;
      const latest = pending && (await pending.catch(() => null));
      if (pending !== current) return current ?? renew(); // renewed while we waited
      return latest && latest !== used ? latest : renew();
    }

    async function send(request, session) {
      const attempt = request.clone();
      attempt.headers.set("Authorization", "Bearer " + session.client_secret);
      return baseFetch(attempt);
    }

    async function isExpired(response) {
      if (response.status !== 401) return false;
      try {
        const body = await response.clone().json();
        return body?.error?.code === "client_secret_expired";
      } catch {
        return false;
      }
    }

    return async function gatewayFetch(input, init) {
      // A Request can be cloned (body included) for the one retry.
      const request = new Request(input, init);
      const used = await activeSession();
      const response = await send(request, used);
      if (!(await isExpired(response))) return response;
      return send(request, await renewAfter(used));
    };
  }

  global.createGatewayFetch = createGatewayFetch;
})(globalThis);
