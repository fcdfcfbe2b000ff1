// Resume and reuse on the job page: a Resume button for a Failed or Stopped job (POST
// /job/{id}/resume), and the job's attempt and response cache counts among its facts.
// Uses app.js's helpers (api, h, flash, refreshNow, jobView, hooks); loaded after it.
"use strict";

const RESUMABLE = new Set(["Failed", "Stopped"]);

const resumeButton = {
  button: null,

  attach() {
    if (this.button) return this.button;
    const stop = document.getElementById("stop-button");
    if (!stop) return null;
    this.button = h(
      "button",
      { id: "resume-button", type: "button", "data-testid": "resume-button", hidden: true },
      "Resume",
    );
    this.button.title = "Run it again as its next attempt; cached answers are not recomputed";
    this.button.addEventListener("click", () => this.resume());
    stop.after(this.button);
    return this.button;
  },

  show(job) {
    const button = this.attach();
    if (!button) return;
    button.hidden = !RESUMABLE.has(job.status);
    button.disabled = button.hidden;
  },

  async resume() {
    const id = jobView.id;
    this.button.disabled = true;
    try {
      const data = await api(`job/${id}/resume`, { method: "POST" });
      flash(data.message);
    } catch (err) {
      flash(err.message, "error");
    }
    refreshNow();
  },
};

function cacheText(cache) {
  if (!cache) return "—";
  return `${cache.hits} hits, ${cache.misses} misses`;
}

hooks.jobFacts.push((job) => {
  resumeButton.show(job);
  const attempt = job.attempt ?? 1;
  const max = job.max_attempts ?? 1;
  const facts = [
    // "of N" only where the job may retry by itself (a resume may go past max_attempts).
    ["Attempt", max > 1 ? `${attempt} of ${max}` : String(attempt)],
    ["Cache", cacheText(job.cache)],
  ];
  if (job.retry_at) facts.push(["Retry at", formatTime(job.retry_at)]);
  return facts;
});
