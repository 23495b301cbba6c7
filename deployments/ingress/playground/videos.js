// The playground's video jobs, shown when the service serves the Videos API. A job is made
// with the multipart form the official client sends, polled until it ends, and its MP4 is
// fetched with the API key (a <video src> cannot send one) and played. Plain JavaScript, no
// build step; `headers`, `errorMessage` and `apiKeyInput` come from playground.js.
"use strict";

const videoSection = document.getElementById("videos");
const videoForm = document.getElementById("video-form");
const videoButton = document.getElementById("make-video");
const videoProgress = document.getElementById("video-progress");
const videoStatus = document.getElementById("video-status");
const videoError = document.getElementById("video-error");
const videoPlayer = document.getElementById("video-player");
const POLL_MS = 500;

// The key alone: a multipart body sets its own content type (with its boundary).
function keyHeaders() {
  const result = headers();
  delete result["content-type"];
  return result;
}

async function showVideosIfServed() {
  try {
    const response = await fetch("v1/videos?limit=1", { headers: keyHeaders() });
    videoSection.hidden = !response.ok;
  } catch (_) {
    videoSection.hidden = true;
  }
}

function videoFailed(message) {
  videoError.textContent = message;
  videoError.hidden = false;
}

function videoFormData() {
  const body = new FormData();
  for (const field of ["prompt", "model", "seconds", "size"]) {
    const value = document.getElementById(`video_${field}`).value.trim();
    if (value) body.append(field, value);
  }
  return body;
}

// Polls the job until it ends; shows its progress meanwhile. The ended job, or null.
async function followJob(video) {
  videoProgress.hidden = false;
  while (video.status === "queued" || video.status === "in_progress") {
    videoProgress.value = video.progress / 100;
    videoStatus.textContent = `${video.id}: ${video.status.replace("_", " ")}, ${video.progress}%`;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    const response = await fetch(`v1/videos/${video.id}`, { headers: keyHeaders() });
    if (!response.ok) {
      videoFailed(await errorMessage(response));
      return null;
    }
    video = await response.json();
  }
  return video;
}

async function makeVideo(event) {
  event.preventDefault();
  videoError.hidden = true;
  videoPlayer.hidden = true;
  videoButton.disabled = true;
  try {
    const response = await fetch("v1/videos", {
      method: "POST", headers: keyHeaders(), body: videoFormData(),
    });
    if (!response.ok) return videoFailed(await errorMessage(response));
    const video = await followJob(await response.json());
    if (video === null) return;
    if (video.status === "failed") {
      return videoFailed(video.error ? video.error.message : "The video could not be made.");
    }
    videoProgress.value = 1;
    videoStatus.textContent = `${video.id}: completed, ${video.seconds} s at ${video.size}`;
    const clip = await fetch(`v1/videos/${video.id}/content`, { headers: keyHeaders() });
    if (!clip.ok) return videoFailed(await errorMessage(clip));
    if (videoPlayer.src) URL.revokeObjectURL(videoPlayer.src);
    videoPlayer.src = URL.createObjectURL(await clip.blob());
    videoPlayer.hidden = false;
  } catch (_) {
    videoFailed("Could not reach the service.");
  } finally {
    videoButton.disabled = false;
  }
}

videoForm.addEventListener("submit", makeVideo);
apiKeyInput.addEventListener("change", showVideosIfServed);
showVideosIfServed();
