//! Continuous batching policy: which requests join the running batch and what
//! the next pass over the weights does. A plain struct, no model, so that its
//! decisions are unit-tested.
//!
//! A pass is either one prompt chunk of one sequence (compute-bound: a GEMM
//! over many rows) or one decode step of every sequence already generating
//! (bandwidth-bound: one read of the weights serves all of them). Mixing the
//! two in one pass would make a sequence's numbers depend on its neighbours.

use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    /// Sequences in the batch at once. More share each decode step's weight
    /// reads (higher throughput) but each step takes longer (slower tokens for
    /// everyone) and each holds a KV cache.
    pub max_sequences: usize,
    /// KV tokens reserved by the batch (prompt + answer budget of every member):
    /// bounds the memory of the caches.
    pub max_batch_tokens: usize,
    /// Prompt tokens per prompt pass. Shorter ones let decode steps in sooner
    /// and keep a pass's activations in the caches (a 512-row chunk's MLP
    /// activations are 18 MB for the 1.5B model): on 2 cores 256 read
    /// 1,024-token prompts 1.1-1.3x faster than 512. 128 was faster for the
    /// 1.5B's 512-token prompts, but slower for the 0.5B and for a 1,000-token
    /// thread's summary (BENCHMARKS.md). Below 64 rows the int8 GEMM's row
    /// tiles run part empty.
    pub prompt_chunk: usize,
    /// Prompt passes allowed between two decode steps while sequences are
    /// generating: a long new prompt delays others' next token by at most this.
    pub prompt_passes_per_decode: usize,
    /// Share of the model's time that goes to decode steps while prompts are
    /// also waiting (0 to 1). A prompt chunk takes seconds and a decode step a
    /// few tens of ms, so one step per chunk starves the summaries already
    /// generating: all of a burst would finish together at its end. With
    /// 0.5, after each chunk decode steps run for as long as the chunk took;
    /// the first summaries of a burst finish early and the last no later
    /// than the total work allows.
    pub decode_share: f32,
    /// Drafted tokens a sequence may check per decode pass (0: none). Each
    /// accepted one is a token without a pass of its own; each rejected one
    /// costs a row of compute. On 2 cores a pass of 5 rows costs 1.5x (0.5B)
    /// to 1.7x (1.5B) a pass of one, of 9 rows 2.1x to 3x (BENCHMARKS.md).
    pub max_draft: usize,
    /// Rows a decode pass may hold with drafts: alone, a sequence checks
    /// `max_draft` tokens for little more than the cost of one (reading the
    /// weights dominates); in a fuller batch the rows already share that read,
    /// and drafts would make the pass compute-bound.
    pub decode_rows: usize,
    /// Tokens of a conversation's previous answer checked as a draft in the
    /// pass that reads the prompt's last chunk (0: none). A grown thread's
    /// note mostly opens as before, and a row of that wide pass costs about
    /// 0.6x a row of a 5-row decode pass; a guess that is wrong from its
    /// start costs the rows, about 7 ms each for the 1.5B on 2 cores.
    pub prefill_draft: usize,
    /// Prompt passes a prompt may be overtaken by shorter ones that came
    /// after it before it goes first again (0: strict arrival order). The
    /// shortest prompt left is read first, so a thread re-summarised after
    /// one message (its new ~80 tokens) does not wait behind new 1,000-token
    /// threads; each overtake delays the longer prompt by one short pass.
    pub prompt_overtakes: usize,
    /// Background sequences in the batch at once: the slots left are kept
    /// for requests someone waits for. Background prompts are read only
    /// while no interactive request is being read or written.
    pub max_background: usize,
    /// Background sequences stepped in a decode pass that steps interactive
    /// ones too. Each extra row slows the agents' tokens (a 5-row pass of
    /// the 1.5B costs 1.65x one row on 2 cores; an agent's note came in 10.4
    /// s with 0 and 15.7 s with every background row riding, BENCHMARKS.md);
    /// with 0 background notes pause while an agent's is written. With no
    /// interactive sequence generating, every background one is stepped.
    pub background_riders: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            max_sequences: 8,
            max_batch_tokens: 16_384,
            prompt_chunk: 256,
            prompt_passes_per_decode: 1,
            decode_share: 0.5,
            max_draft: 4,
            decode_rows: 6,
            prefill_draft: 64,
            prompt_overtakes: 4,
            max_background: 4,
            background_riders: 0,
        }
    }
}

/// Who waits for a generation. Ordered: interactive work goes first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Someone is waiting for it (an agent opened the chat).
    #[default]
    Interactive,
    /// Nobody is waiting yet (a note prepared after each new message, a bulk
    /// job): it takes the time interactive work leaves.
    Background,
}

/// What the model thread does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Read the next chunk (`tokens` long) of the prompt of the member at this index.
    Prompt { member: usize, tokens: usize },
    /// One token for every member that has finished reading its prompt.
    Decode,
}

/// A member of the running batch as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Prompt tokens not yet read (0 once generating).
    pub prompt_left: usize,
    /// Tokens reserved: prompt + answer budget.
    pub reserved: usize,
    /// Prompt passes that went to members behind this one since its own last
    /// prompt pass.
    pub overtaken: usize,
    pub priority: Priority,
}

/// Scheduling state across passes.
#[derive(Debug, Default)]
pub struct Scheduler {
    prompt_passes_since_decode: usize,
    /// Decode time owed to the generating sequences for the prompt passes
    /// that ran while they waited.
    owed: Duration,
}

impl BatchPolicy {
    /// Where a new request of `priority` joins the queue (`waiting`, the
    /// queued requests' priorities in queue order): behind every request of
    /// its priority or a more urgent one, ahead of the rest.
    pub fn queue_position(waiting: impl IntoIterator<Item = Priority>, priority: Priority) -> usize {
        waiting.into_iter().take_while(|&w| w <= priority).count()
    }

    /// How many of the `waiting` requests (tokens each would reserve and its
    /// priority, in queue order) join now. Queue order is kept: a large
    /// request at the head is not overtaken by smaller ones behind it, so
    /// nobody waits forever. A request larger than the whole budget still
    /// runs, alone. Background requests stop at `max_background` in the batch.
    pub fn admit(&self, members: &[Member], waiting: &VecDeque<(usize, Priority)>) -> usize {
        let mut used: usize = members.iter().map(|m| m.reserved).sum();
        let mut background = members.iter().filter(|m| m.priority == Priority::Background).count();
        let mut admitted = 0;
        for &(need, priority) in waiting {
            let n = members.len() + admitted;
            if n >= self.max_sequences || (n > 0 && used + need > self.max_batch_tokens) {
                break;
            }
            if priority == Priority::Background {
                if background >= self.max_background {
                    break;
                }
                background += 1;
            }
            used += need;
            admitted += 1;
        }
        admitted
    }
}

impl BatchPolicy {
    /// Whose prompt the next prompt pass reads (`members` in arrival order):
    /// among the most urgent priority reading, the shortest left, the oldest
    /// on a tie, unless an older one has been overtaken `prompt_overtakes`
    /// times: then the oldest such one. No background prompt while an
    /// interactive sequence generates: its tokens would wait for the pass.
    pub fn prompt_to_read(&self, members: &[Member]) -> Option<usize> {
        let top = members.iter().filter(|m| m.prompt_left > 0).map(|m| m.priority).min()?;
        if top == Priority::Background && interactive_generating(members) {
            return None;
        }
        let reading = members.iter().enumerate().filter(|(_, m)| m.prompt_left > 0 && m.priority == top);
        if let Some((i, _)) = reading.clone().find(|(_, m)| m.overtaken >= self.prompt_overtakes) {
            return Some(i);
        }
        reading.min_by_key(|&(i, m)| (m.prompt_left, i)).map(|(i, _)| i)
    }

    /// Each member's `overtaken` after a prompt pass read `read`'s prompt:
    /// one more for the older members of its priority still reading, none
    /// for `read`. Background prompts wait for interactive ones without
    /// counting it: they have no one waiting.
    pub fn overtaken_after(members: &[Member], read: usize) -> Vec<usize> {
        (0..members.len())
            .map(|i| {
                let m = &members[i];
                match i {
                    _ if i == read => 0,
                    _ if i < read && m.prompt_left > 0 && m.priority == members[read].priority => m.overtaken + 1,
                    _ => m.overtaken,
                }
            })
            .collect()
    }

    /// Whether decode steps compete with prompt passes for the model's time
    /// (`decode_share`): some sequence is generating whose priority is at
    /// least that of the prompt read next. Background notes being written do
    /// not hold up an interactive prompt; with no prompt waiting every
    /// sequence generates.
    pub fn decode_competes(&self, members: &[Member]) -> bool {
        let bar = self.prompt_to_read(members).map_or(Priority::Background, |i| members[i].priority);
        members.iter().any(|m| m.prompt_left == 0 && m.priority <= bar)
    }

    /// Which members a decode pass steps: every interactive one generating,
    /// and up to `background_riders` background ones (the oldest) beside
    /// them; every background one when no interactive one generates.
    pub fn stepped(&self, members: &[Member]) -> Vec<bool> {
        let mut riders = if interactive_generating(members) { self.background_riders } else { usize::MAX };
        members
            .iter()
            .map(|m| match (m.prompt_left, m.priority) {
                (0, Priority::Interactive) => true,
                (0, Priority::Background) if riders > 0 => {
                    riders -= 1;
                    true
                }
                _ => false,
            })
            .collect()
    }

    /// Drafted tokens each of `generating` sequences may check in one pass.
    pub fn draft_per_sequence(&self, generating: usize) -> usize {
        if generating == 0 {
            return 0;
        }
        self.max_draft.min((self.decode_rows / generating).saturating_sub(1))
    }
}

/// Whether an agent's note is being written.
fn interactive_generating(members: &[Member]) -> bool {
    members.iter().any(|m| m.prompt_left == 0 && m.priority == Priority::Interactive)
}

impl Scheduler {
    /// The next pass, or None when the batch is empty.
    pub fn next(&mut self, policy: &BatchPolicy, members: &[Member]) -> Option<Pass> {
        let generating = policy.decode_competes(members);
        let reading = policy.prompt_to_read(members);
        let pass = match reading {
            Some(_) if generating && !self.owed.is_zero() => Pass::Decode,
            Some(i) if !generating || self.prompt_passes_since_decode < policy.prompt_passes_per_decode => {
                Pass::Prompt { member: i, tokens: members[i].prompt_left.min(policy.prompt_chunk.max(1)) }
            }
            _ if generating => Pass::Decode,
            _ => return None,
        };
        match pass {
            Pass::Prompt { .. } => self.prompt_passes_since_decode += 1,
            Pass::Decode => self.prompt_passes_since_decode = 0,
        }
        if reading.is_none() || !generating {
            self.owed = Duration::ZERO; // nothing to balance
        }
        Some(pass)
    }

    /// Accounts a pass that took `took`, given whether decode steps competed
    /// with it (`BatchPolicy::decode_competes` before the pass).
    pub fn record(&mut self, policy: &BatchPolicy, pass: Pass, took: Duration, generating: bool) {
        match pass {
            Pass::Prompt { .. } if generating => {
                let share = policy.decode_share.clamp(0.0, 0.95);
                self.owed += took.mul_f32(share / (1.0 - share));
            }
            Pass::Prompt { .. } => {}
            Pass::Decode => self.owed = self.owed.saturating_sub(took),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(left: usize) -> Member {
        Member { prompt_left: left, reserved: left + 100, overtaken: 0, priority: Priority::Interactive }
    }
    fn generating() -> Member {
        Member { prompt_left: 0, reserved: 500, overtaken: 0, priority: Priority::Interactive }
    }
    fn background(m: Member) -> Member {
        Member { priority: Priority::Background, ..m }
    }

    #[test]
    fn admission_respects_sequence_and_token_budgets_in_arrival_order() {
        let p = BatchPolicy { max_sequences: 3, max_batch_tokens: 1000, ..Default::default() };
        let q = |needs: &[usize]| needs.iter().map(|&n| (n, Priority::Interactive)).collect::<VecDeque<_>>();
        assert_eq!(p.admit(&[], &q(&[300, 300, 300, 300])), 3, "three fit the token budget and the sequence cap");
        assert_eq!(p.admit(&[generating()], &q(&[300, 300, 300, 300])), 1, "500 reserved + 300; another 300 would pass 1000");
        assert_eq!(p.admit(&[generating()], &q(&[900, 10])), 0, "the large head waits; the small one behind does not overtake");
        assert_eq!(p.admit(&[], &q(&[5000])), 1, "over the budget, but alone it runs");
        assert_eq!(p.admit(&[generating(), generating(), generating()], &q(&[1])), 0);
    }

    #[test]
    fn background_requests_queue_behind_interactive_ones_and_keep_slots_free() {
        use Priority::{Background as B, Interactive as I};
        assert_eq!(BatchPolicy::queue_position([], I), 0);
        assert_eq!(BatchPolicy::queue_position([I, I, B, B], I), 2, "behind the interactive, ahead of the background");
        assert_eq!(BatchPolicy::queue_position([I, I, B, B], B), 4);
        assert_eq!(BatchPolicy::queue_position([B, B], I), 0);
        let p = BatchPolicy { max_sequences: 4, max_background: 2, ..Default::default() };
        let bg = [background(generating()), background(generating())];
        assert_eq!(p.admit(&bg, &[(10, B), (10, B)].into()), 0, "two background slots taken");
        assert_eq!(p.admit(&bg, &[(10, I), (10, I), (10, I)].into()), 2, "the other two are for interactive work");
        assert_eq!(p.admit(&[generating()], &[(10, B), (10, B), (10, B)].into()), 2);
    }

    #[test]
    fn an_interactive_prompt_goes_before_background_work() {
        let p = BatchPolicy { prompt_overtakes: 2, ..Default::default() };
        // Read first, even when longer and younger; the background prompt is
        // not counted as overtaken, however often.
        let m = [background(Member { overtaken: 5, ..reading(80) }), reading(1040)];
        assert_eq!(p.prompt_to_read(&m), Some(1));
        assert_eq!(BatchPolicy::overtaken_after(&m, 1), [5, 0]);
        assert_eq!(p.prompt_to_read(&[background(reading(80)), background(generating())]), Some(0), "alone, background prompts are read");
        assert_eq!(p.prompt_to_read(&[background(reading(80)), generating()]), None, "not while an agent's note is written");
        // Background notes being written do not take time from an interactive
        // prompt; interactive ones do, and everything decodes once prompts are read.
        let mut s = Scheduler::default();
        let m = [background(generating()), reading(1040)];
        assert!(!p.decode_competes(&m));
        for _ in 0..3 {
            assert!(matches!(s.next(&p, &m), Some(Pass::Prompt { member: 1, .. })));
        }
        assert!(p.decode_competes(&[generating(), reading(1040)]));
        assert!(p.decode_competes(&[background(generating()), background(reading(1040))]));
        assert_eq!(s.next(&p, &[background(generating()), generating()]), Some(Pass::Decode));
    }

    #[test]
    fn background_notes_ride_along_only_as_far_as_allowed() {
        let p = BatchPolicy { background_riders: 1, ..Default::default() };
        let bg = background(generating());
        assert_eq!(p.stepped(&[bg, generating(), bg, reading(10)]), [true, true, false, false], "the oldest rides");
        assert_eq!(BatchPolicy::default().stepped(&[bg, generating(), bg]), [false, true, false]);
        assert_eq!(BatchPolicy::default().stepped(&[bg, reading(10), bg]), [true, false, true], "no agent's note: all step");
    }

    #[test]
    fn prompts_are_chunked_and_interleaved_with_decode_steps() {
        let p = BatchPolicy { prompt_chunk: 512, prompt_passes_per_decode: 1, ..Default::default() };
        let mut s = Scheduler::default();
        // Nobody generating: read the prompt chunk after chunk.
        assert_eq!(s.next(&p, &[reading(1200)]), Some(Pass::Prompt { member: 0, tokens: 512 }));
        assert_eq!(s.next(&p, &[reading(688)]), Some(Pass::Prompt { member: 0, tokens: 512 }));
        assert_eq!(s.next(&p, &[reading(176)]), Some(Pass::Prompt { member: 0, tokens: 176 }));
        // One generating, one new prompt: they alternate, the decoder first
        // since prompt passes ran last.
        let m = [generating(), reading(1000)];
        assert_eq!(s.next(&p, &m), Some(Pass::Decode));
        assert_eq!(s.next(&p, &m), Some(Pass::Prompt { member: 1, tokens: 512 }));
        assert_eq!(s.next(&p, &m), Some(Pass::Decode));
        assert_eq!(s.next(&p, &m), Some(Pass::Prompt { member: 1, tokens: 512 }));
        // The shortest prompt is read first.
        let m = [generating(), reading(20), reading(10)];
        assert_eq!(s.next(&p, &m), Some(Pass::Decode));
        assert_eq!(s.next(&p, &m), Some(Pass::Prompt { member: 2, tokens: 10 }));
        assert_eq!(s.next(&p, &[generating(), generating()]), Some(Pass::Decode));
        assert_eq!(s.next(&p, &[generating()]), Some(Pass::Decode), "decoders never starve");
        assert_eq!(s.next(&p, &[]), None);
    }

    #[test]
    fn short_prompts_go_first_but_overtake_a_long_one_only_so_often() {
        let p = BatchPolicy { prompt_overtakes: 2, ..Default::default() };
        let m = |left: usize, overtaken: usize| Member { overtaken, ..reading(left) };
        // A re-summarised thread's 80 new tokens before a new thread's 1,040.
        assert_eq!(p.prompt_to_read(&[m(1040, 0), m(80, 0)]), Some(1));
        // A prompt half read is closer to done than a new one of the same size.
        assert_eq!(p.prompt_to_read(&[m(1040, 0), m(528, 0)]), Some(1));
        // Ties go to the oldest; members generating are never picked.
        assert_eq!(p.prompt_to_read(&[generating(), m(80, 0), m(80, 0)]), Some(1));
        assert_eq!(p.prompt_to_read(&[generating(), generating()]), None);
        // Overtaken once, the long prompt still waits; twice, it goes first
        // (the oldest such one).
        assert_eq!(p.prompt_to_read(&[m(1040, 1), m(80, 0)]), Some(1));
        assert_eq!(p.prompt_to_read(&[m(1040, 2), m(80, 0)]), Some(0));
        assert_eq!(p.prompt_to_read(&[m(900, 2), m(1040, 3), m(80, 0)]), Some(0));
        // 0 keeps strict arrival order.
        let fifo = BatchPolicy { prompt_overtakes: 0, ..p };
        assert_eq!(fifo.prompt_to_read(&[generating(), m(1040, 0), m(80, 0)]), Some(1));
    }

    #[test]
    fn a_long_prompt_gets_a_pass_at_least_every_overtakes_plus_one_passes() {
        // A 1,040-token prompt, and a new 80-token one arriving after every
        // pass: the shorts never run out, the long one still progresses.
        let p = BatchPolicy { prompt_chunk: 256, prompt_overtakes: 3, ..Default::default() };
        let mut members = vec![reading(1040)];
        let mut long_passes = Vec::new();
        for pass in 0..40 {
            members.push(reading(80));
            let read = p.prompt_to_read(&members).unwrap();
            let counts = BatchPolicy::overtaken_after(&members, read);
            for (m, n) in members.iter_mut().zip(counts) {
                m.overtaken = n;
            }
            members[read].prompt_left -= members[read].prompt_left.min(p.prompt_chunk);
            if read == 0 {
                long_passes.push(pass);
            }
            members.retain(|m| m.prompt_left > 0);
            if long_passes.len() == 5 {
                break;
            }
        }
        // Four chunks of 256, each after 3 shorts went first; the last 16
        // tokens are then the shortest prompt left.
        assert_eq!(long_passes, [3, 7, 11, 15, 16]);
        assert!(members.iter().all(|m| m.prompt_left == 80), "the long prompt is read whole");
        // With 0, the long prompt goes first every time.
        let fifo = BatchPolicy { prompt_overtakes: 0, ..p };
        let m = [reading(1040), reading(80)];
        assert_eq!(fifo.prompt_to_read(&m), Some(0));
        assert_eq!(BatchPolicy::overtaken_after(&m, 0), [0, 0], "the younger one is not overtaken");
        assert_eq!(BatchPolicy::overtaken_after(&[reading(1040), generating(), reading(80)], 2), [1, 0, 0]);
    }

    #[test]
    fn drafts_shrink_as_the_batch_fills() {
        let p = BatchPolicy { max_draft: 8, decode_rows: 16, ..Default::default() };
        assert_eq!(BatchPolicy::default().draft_per_sequence(4), 0, "by default four or more generate without drafts");
        assert_eq!(p.draft_per_sequence(1), 8, "alone: the full draft");
        assert_eq!(p.draft_per_sequence(2), 7, "two sequences of 8 rows");
        assert_eq!(p.draft_per_sequence(4), 3);
        assert_eq!(p.draft_per_sequence(8), 1);
        assert_eq!(p.draft_per_sequence(16), 0, "a full pass checks no drafts");
        assert_eq!(p.draft_per_sequence(0), 0);
        assert_eq!(BatchPolicy { max_draft: 0, ..p }.draft_per_sequence(1), 0, "drafting off");
    }

    #[test]
    fn decode_steps_get_their_share_of_time_while_prompts_wait() {
        let p = BatchPolicy { prompt_passes_per_decode: 1, decode_share: 0.5, ..Default::default() };
        let mut s = Scheduler::default();
        let m = [generating(), reading(5000)];
        let ms = Duration::from_millis;
        let run = |s: &mut Scheduler, took: Duration| {
            let pass = s.next(&p, &m).unwrap();
            s.record(&p, pass, took, true);
            pass
        };
        assert!(matches!(run(&mut s, ms(4000)), Pass::Prompt { .. }));
        // A 4 s chunk buys 4 s of decode steps of 50 ms: 80 of them.
        let decodes = (0..200).take_while(|_| run(&mut s, ms(50)) == Pass::Decode).count();
        assert_eq!(decodes, 80);
        // With a share of 0.2, a quarter of the chunk's time.
        let p = BatchPolicy { decode_share: 0.2, ..p };
        let mut s = Scheduler::default();
        s.record(&p, Pass::Prompt { member: 1, tokens: 512 }, ms(4000), true);
        let decodes = (0..200)
            .take_while(|_| {
                let pass = s.next(&p, &m).unwrap();
                s.record(&p, pass, ms(50), true);
                pass == Pass::Decode
            })
            .count();
        assert_eq!(decodes, 20);
        // Prompt time spent while nobody generated is owed to no one.
        let mut s = Scheduler::default();
        s.record(&p, Pass::Prompt { member: 0, tokens: 512 }, ms(4000), false);
        assert!(matches!(s.next(&p, &m), Some(Pass::Prompt { .. })));
    }

    #[test]
    fn more_prompt_passes_per_decode_favour_newcomers() {
        let p = BatchPolicy { prompt_passes_per_decode: 2, ..Default::default() };
        let mut s = Scheduler::default();
        let m = [generating(), reading(5000)];
        let passes: Vec<_> = (0..6).map(|_| s.next(&p, &m).unwrap()).collect();
        let decodes = passes.iter().filter(|p| **p == Pass::Decode).count();
        assert_eq!(decodes, 2, "{passes:?}");
    }
}
