//! SANA's prompt encoding (diffusers' `SanaPipeline.encode_prompt`): the prompt lower-cased and
//! stripped, optionally behind the complex-human-instruction (CHI) prefix; tokenized with `<bos>`
//! and cut to `n_chi + max_sequence_length - 2` tokens (`n_chi` the prefix's own token count,
//! `<bos>` included); Gemma-2's last hidden state; then the paper's token selection (sec. 3.1):
//! `<bos>` plus the last `max_sequence_length - 1` positions of the padded row, which drops the
//! prefix but for its last token. Only the selected real tokens are returned (the transformer
//! masks the rest).

use std::path::PathBuf;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::encode_fixed_length;
use super::gemma2::Gemma2TextEncoder;
use crate::error::{Error, Result};

/// The default `complex_human_instruction` of diffusers' `SanaPipeline` (the SANA repo's
/// inference config), joined with newlines before the prompt.
pub const DEFAULT_COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// One encoded prompt.
pub struct SanaPromptEmbeds {
    /// `[1, n, hidden]`: the selected real tokens' states.
    pub states: Tensor,
    /// The text cut off by the token limit, when there was any.
    pub removed_text: Option<String>,
}

/// The Gemma tokenizer and encoder of a SANA checkpoint.
pub struct SanaTextEncoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub encoder: &'a Gemma2TextEncoder,
    /// The tokenizer folder, for messages.
    pub source: PathBuf,
}

impl SanaTextEncoder<'_> {
    /// diffusers' `_text_preprocessing(clean_caption=False)`: lower-case, strip.
    fn preprocess(text: &str) -> String {
        text.to_lowercase().trim().to_string()
    }

    /// The tokens of the prompt as SANA feeds them (before the selection), and the padded length.
    pub fn tokenize(
        &self,
        text: &str,
        max_sequence_length: usize,
        chi: &[String],
    ) -> Result<(Vec<u32>, usize, Option<String>)> {
        if max_sequence_length < 2 {
            return Err(Error::invalid(format!("max sequence length {max_sequence_length}: SANA needs at least 2")));
        }
        let text = Self::preprocess(text);
        let (full, max_all) = if chi.is_empty() {
            (text, max_sequence_length)
        } else {
            let prefix = chi.join("\n");
            let n_chi = self
                .tokenizer
                .encode(prefix.as_str(), true)
                .map_err(|e| Error::other(format!("tokenizing with {}: {e}", self.source.display())))?
                .len();
            (prefix + &text, n_chi + max_sequence_length - 2)
        };
        let tok = encode_fixed_length(self.tokenizer, &full, max_all, 0, &self.source)?;
        let ids = tok.ids[..tok.len].to_vec();
        Ok((ids, max_all, tok.removed_text))
    }

    pub fn encode(&self, text: &str, max_sequence_length: usize, chi: &[String]) -> Result<SanaPromptEmbeds> {
        let (ids, max_all, removed_text) = self.tokenize(text, max_sequence_length, chi)?;
        let states = self.encoder.encode(&ids)?;
        // Selected positions: 0 and max_all - msl + 1 .. max_all; the real ones are < ids.len().
        let start = (max_all + 1 - max_sequence_length).max(1);
        let states = if start >= ids.len() {
            states.narrow(1, 0, 1)?
        } else if start == 1 {
            states
        } else {
            Tensor::cat(&[states.narrow(1, 0, 1)?, states.narrow(1, start, ids.len() - start)?], 1)?
        };
        Ok(SanaPromptEmbeds { states, removed_text })
    }
}
