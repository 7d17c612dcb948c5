//! A `sockudo:resume` over its channels, one page of frames at a time. The session runs
//! [`ResumeRun::step`] in a pool slot, writes what it returns, and asks for the next step
//! only once the socket has taken those frames: a resuming socket holds about one page
//! however much it missed, and however many channels it resumes.

use std::collections::VecDeque;

use serde_json::{json, Value};

use super::protocol::AppendMode;
use super::replay::{failure, ChannelResume, Position, RESUME_PAGE};
use crate::error::ApiError;
use crate::registry::Registry;

/// Whether the member that admitted a socket to a channel (if any) still may see it.
pub type Visibility = fn(&Registry, &str, &str, Option<&str>) -> Result<bool, ApiError>;

/// A channel the client asked to resume.
pub struct Wanted {
    pub channel: String,
    pub pos: Position,
    /// The entity whose membership admitted the socket (chat channels).
    pub via_member: Option<String>,
}

/// What a step read, for the session to write in this order.
pub enum Step {
    /// Replayed frames of `channel`, `(serial, frame)` in serial order.
    Frames {
        channel: String,
        frames: Vec<(i64, String)>,
    },
    /// `channel`'s replay is complete: its `recovered` entry, whose `replayed` the session
    /// sets to the frames it sent.
    Recovered(Value),
    /// A channel that could not be resumed (after any frames of it already written).
    Failed { channel: String, failure: Value },
}

pub struct ResumeRun {
    workspace_id: String,
    max_replay: i64,
    mode: AppendMode,
    pending: VecDeque<Wanted>,
    current: Option<ChannelResume>,
}

impl ResumeRun {
    pub fn new(
        workspace_id: String,
        max_replay: i64,
        mode: AppendMode,
        wanted: Vec<Wanted>,
    ) -> Self {
        Self {
            workspace_id,
            max_replay,
            mode,
            pending: wanted.into(),
            current: None,
        }
    }

    /// Whether every channel was recovered or failed.
    pub fn is_finished(&self) -> bool {
        self.current.is_none() && self.pending.is_empty()
    }

    /// The channels not yet recovered or failed (when a step could not run at all).
    pub fn unfinished(&self) -> Vec<String> {
        let current = self.current.as_ref().map(|c| c.channel_name().to_string());
        current
            .into_iter()
            .chain(self.pending.iter().map(|w| w.channel.clone()))
            .collect()
    }

    /// Reads on until it has a page of frames to write, or every channel is done. Blocking:
    /// runs in a pool slot.
    pub fn step(&mut self, registry: &Registry, visible: Visibility) -> Vec<Step> {
        let mut steps = Vec::new();
        loop {
            if let Some(mut resume) = self.current.take() {
                let channel = resume.channel_name().to_string();
                let page = registry
                    .pool()
                    .get()
                    .map_err(ApiError::from)
                    .and_then(|mut conn| resume.page(&mut conn, RESUME_PAGE));
                match page {
                    Ok(Ok(frames)) => {
                        let wrote = !frames.is_empty();
                        if wrote {
                            steps.push(Step::Frames {
                                channel: channel.clone(),
                                frames,
                            });
                        }
                        if resume.is_done() {
                            steps.push(Step::Recovered(resume.summary(0)));
                        } else {
                            self.current = Some(resume);
                        }
                        if wrote {
                            return steps;
                        }
                    }
                    Ok(Err(failure)) => steps.push(Step::Failed { channel, failure }),
                    Err(_) => steps.push(unavailable(channel)),
                }
                continue;
            }
            let Some(w) = self.pending.pop_front() else {
                return steps;
            };
            match self.start(registry, visible, &w) {
                Ok(Ok(resume)) => self.current = Some(resume),
                Ok(Err(failure)) => steps.push(Step::Failed {
                    channel: w.channel,
                    failure,
                }),
                Err(_) => steps.push(unavailable(w.channel)),
            }
        }
    }

    fn start(
        &self,
        registry: &Registry,
        visible: Visibility,
        w: &Wanted,
    ) -> Result<Result<ChannelResume, Value>, ApiError> {
        let ws = self.workspace_id.as_str();
        if !visible(registry, ws, &w.channel, w.via_member.as_deref())? {
            let mut f = failure(&w.channel, "continuity_unverifiable", None, None);
            f["reason"] = json!("the signed-in user may no longer see this channel");
            return Ok(Err(f));
        }
        let mut conn = registry.pool().get()?;
        ChannelResume::start(
            &mut conn,
            ws,
            &w.channel,
            &w.pos,
            self.max_replay,
            self.mode,
        )
    }
}

/// The failure of a channel whose log could not be read.
pub fn unavailable(channel: String) -> Step {
    let failure = failure(&channel, "persistence_unavailable", None, None);
    Step::Failed { channel, failure }
}
