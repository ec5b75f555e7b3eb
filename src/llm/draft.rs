//! Drafts for decoding several tokens per pass without changing the answer.
//!
//! A summary copies much of what it reads: names, order numbers, whole
//! phrases of the thread; and when a helpdesk re-summarises a thread after
//! one new message, most of the new summary is the previous one. So the
//! tokens that follow the answer's last few tokens in the previous answer,
//! or in the prompt, are a good guess of what comes next. A decode pass
//! then reads the last token and the guess together; the model's own greedy
//! choice at each position keeps the guessed tokens it agrees with and
//! replaces the first it does not (`Llm::decode`). Every kept token is the
//! one greedy decoding would have chosen, so the answer is unchanged; only
//! the number of passes over the weights falls.

/// Longest run of recent tokens looked up in a source.
const MAX_NGRAM: usize = 4;
/// Recent tokens a caller needs to pass as `history`.
pub const HISTORY: usize = MAX_NGRAM;
/// In the prompt, a short run matches too much to be a useful guess (a
/// summary rephrases more than it copies); in the previous answer, position
/// disambiguates it.
const MIN_NGRAM_PROMPT: usize = 3;

/// Up to `max` tokens guessed to follow `history` (the prompt's tail and the
/// answer so far, last token included): first from `previous` (an earlier
/// answer for the same conversation), else from `prompt`. Empty when
/// nothing matches.
pub fn propose(history: &[u32], previous: &[u32], prompt: &[u32], max: usize, answer_len: usize) -> Vec<u32> {
    if max == 0 || history.is_empty() {
        return Vec::new();
    }
    for n in (1..=MAX_NGRAM.min(history.len())).rev() {
        let tail = &history[history.len() - n..];
        // The previous answer runs roughly in step with this one: of its
        // matches, take the one nearest the same position.
        let near = matches(previous, tail).min_by_key(|&end| end.abs_diff(answer_len));
        if let Some(end) = near {
            let guess = &previous[end..previous.len().min(end + max)];
            if !guess.is_empty() {
                return guess.to_vec();
            }
        }
        if n >= MIN_NGRAM_PROMPT {
            // The latest mention in the prompt is the likeliest to be copied.
            if let Some(end) = matches(prompt, tail).filter(|&e| e < prompt.len()).last() {
                return prompt[end..prompt.len().min(end + max)].to_vec();
            }
        }
    }
    Vec::new()
}

/// End positions of the occurrences of `pattern` in `source`.
fn matches<'a>(source: &'a [u32], pattern: &'a [u32]) -> impl Iterator<Item = usize> + 'a {
    source.windows(pattern.len()).enumerate().filter(move |(_, w)| *w == pattern).map(move |(i, _)| i + pattern.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_previous_answer_where_this_one_is() {
        // "A B C A B D E": after "A B" near position 5, the second "A B" fits.
        let previous = [1, 2, 3, 1, 2, 4, 5];
        assert_eq!(propose(&[9, 1, 2], &previous, &[], 3, 5), vec![4, 5]);
        assert_eq!(propose(&[9, 1, 2], &previous, &[], 3, 2), vec![3, 1, 2]);
    }

    #[test]
    fn prefers_the_longest_match() {
        let previous = [7, 2, 3, 8, 1, 2, 6];
        // "1 2" matches at the end, "2" alone also after 7: the longer wins.
        assert_eq!(propose(&[1, 2], &previous, &[], 2, 0), vec![6]);
    }

    #[test]
    fn falls_back_to_the_latest_mention_in_the_prompt() {
        let prompt = [5, 6, 7, 8, 0, 5, 6, 1, 9, 4, 5, 6, 1, 2, 3];
        assert_eq!(propose(&[3, 5, 6, 1], &[], &prompt, 2, 0), vec![2, 3]);
        // Two tokens alone are not looked up in the prompt.
        assert!(propose(&[3, 5, 6], &[], &prompt, 2, 0).is_empty());
        // A match at the very end has nothing after it.
        assert!(propose(&[7, 1, 2, 3], &[], &prompt, 2, 0).is_empty());
    }

    #[test]
    fn nothing_to_propose() {
        assert!(propose(&[1, 2], &[3, 4], &[5, 6], 4, 0).is_empty());
        assert!(propose(&[], &[3, 4], &[5, 6], 4, 0).is_empty());
        assert!(propose(&[3], &[3, 4], &[5, 6], 0, 0).is_empty());
    }
}
