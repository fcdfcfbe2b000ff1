// A server shared by a team: who you are (GET /me), each job's owner, and for an admin a
// filter by owner. Runs right after app.js (both deferred, so the page is parsed) and before
// its first refresh, so every jobs row is built with the owner cell.
"use strict";

const teamView = {
  me: null, // {name, admin} of the key in use; null when unknown (no key, refused key)
  owners: new Set(), // owners seen in listings: the admin's filter offers these

  init() {
    this.who = h("span", { class: "whoami", "data-testid": "whoami", hidden: true });
    $("key-button").before(this.who);

    const head = document.querySelector("[data-testid=jobs-table] thead tr");
    head.append(h("th", { "data-testid": "owner-header" }, "Owner"));
    this.filter = h(
      "select",
      { id: "owner-filter", "data-testid": "owner-filter", onchange: () => refreshNow() },
      h("option", { value: "" }, "All owners"),
    );
    this.filterLabel = h("label", { class: "inline", hidden: true }, "Owner ", this.filter);
    $("status-filter").closest("label").after(this.filterLabel);

    hooks.jobsParams.push((params) => {
      // Only an admin's list spans owners; anyone else's is theirs already.
      if (this.me && this.me.admin && this.filter.value) params.set("owner", this.filter.value);
    });
    hooks.jobCells.push((job) => {
      this.noteOwner(job.owner);
      return h("td", { class: "ellipsis", title: job.owner, "data-testid": "owner" }, job.owner);
    });
    hooks.jobFacts.push((job) => [["Owner", job.owner]]);

    // Added after app.js's own (it adds them at DOMContentLoaded), so the key is stored, or
    // forgotten, by the time these run.
    document.addEventListener("DOMContentLoaded", () => {
      $("key-form").addEventListener("submit", () => this.load());
      $("key-forget").addEventListener("click", () => this.show(null));
    });
    this.load();
  },

  async load() {
    // Not through api(): a refused key is app.js's to report (its key panel), and an answer
    // to a key that has since changed is dropped.
    const seq = (this.seq = (this.seq || 0) + 1);
    const key = localStorage.getItem(KEY_STORAGE);
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    let me = null;
    try {
      const response = await fetch("me", { headers, cache: "no-store" });
      if (response.ok) me = await response.json();
    } catch (err) {
      // Unreachable: app.js shows the connection banner; the name stays blank.
    }
    if (seq === this.seq) this.show(me);
  },

  show(me) {
    const changed = JSON.stringify(me) !== JSON.stringify(this.me);
    this.me = me;
    this.who.hidden = !me;
    if (me) {
      this.who.replaceChildren("Signed in as ", h("strong", {}, me.name), me.admin ? " (admin)" : "");
      this.who.title = me.admin
        ? "An admin key: sees and acts on every owner's jobs"
        : "Sees and acts on this principal's jobs only";
    }
    this.filterLabel.hidden = !(me && me.admin);
    if (changed) {
      this.filter.value = "";
      // Before app.js's first route() there is no view to refresh; it refreshes itself.
      if (current) refreshNow();
    }
  },

  noteOwner(owner) {
    if (owner && !this.owners.has(owner)) {
      this.owners.add(owner);
      this.renderOwners();
    }
  },

  renderOwners() {
    const selected = this.filter.value;
    const names = [...this.owners].sort();
    this.filter.replaceChildren(
      h("option", { value: "" }, "All owners"),
      ...names.map((name) => h("option", { value: name }, name)),
    );
    this.filter.value = names.includes(selected) ? selected : "";
  },
};

teamView.init();
