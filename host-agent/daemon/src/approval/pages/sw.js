// Nanoclaw service worker: shows a push notice (an approval id, a summary and the approval
// page's URL; never argument values) and opens the approval page when it is clicked.
"use strict";

self.addEventListener("push", (event) => {
  let notice = {};
  try {
    notice = event.data ? event.data.json() : {};
  } catch (e) {
    notice = {};
  }
  event.waitUntil(
    self.registration.showNotification("Nanoclaw: approval needed", {
      body: notice.summary || "An agent is waiting for your approval.",
      tag: notice.approval_id,
      data: { url: notice.url },
      requireInteraction: true,
    }),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const url = event.notification.data && event.notification.data.url;
  // Only our own approval pages are opened.
  if (typeof url === "string" && url.startsWith(self.location.origin + "/approve/")) {
    event.waitUntil(self.clients.openWindow(url));
  }
});
