//! Loading models: diffusers folders, sharded safetensors, the Hugging Face hub cache.

pub mod components;
pub mod config;
pub mod gguf;
pub mod gguf_layout;
pub mod lora;
pub mod model_index;
pub mod model_source;
pub mod quantized;
pub mod safetensors_files;
pub mod single_file;
pub mod weights;
