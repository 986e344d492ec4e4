//! The files of veto's demo model (`models/demo`, trained by `tools/demo/train.py`), embedded
//! in the binary. A crate of its own so that the ~10 MB of bytes are compiled once, not with
//! every change to the library. `veto::demo::model::materialise` writes them to a cache folder
//! that the ordinary diffusers-folder loader then reads.

/// One embedded file: its path inside the model folder and its bytes.
macro_rules! embed {
    ($path:literal) => {
        ($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo/", $path)) as &[u8])
    };
}

/// Every file of the demo model's diffusers folder, by relative path.
pub const FILES: &[(&str, &[u8])] = &[
    embed!("model_index.json"),
    embed!("scheduler/scheduler_config.json"),
    embed!("text_encoder/config.json"),
    embed!("text_encoder/model.safetensors"),
    embed!("text_encoder_2/config.json"),
    embed!("text_encoder_2/model.safetensors"),
    embed!("tokenizer/merges.txt"),
    embed!("tokenizer/special_tokens_map.json"),
    embed!("tokenizer/tokenizer_config.json"),
    embed!("tokenizer/vocab.json"),
    embed!("tokenizer_2/special_tokens_map.json"),
    embed!("tokenizer_2/spiece.model"),
    embed!("tokenizer_2/tokenizer.json"),
    embed!("tokenizer_2/tokenizer_config.json"),
    embed!("transformer/config.json"),
    embed!("transformer/diffusion_pytorch_model.safetensors"),
    embed!("vae/config.json"),
    embed!("vae/diffusion_pytorch_model.safetensors"),
];
