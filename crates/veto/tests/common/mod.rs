//! Shared helpers of the parity tests: fixture paths, safetensors with metadata, tolerances.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures(family: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(family)
}

/// A fixture file: its tensors and its string metadata.
pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
    pub name: String,
}

impl Fixture {
    pub fn load(family: &str, file: &str) -> Fixture {
        let path = fixtures(family).join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Fixture { tensors, meta, name: file.to_string() }
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", self.name))
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn m(&self, key: &str) -> &str {
        self.meta.get(key).unwrap_or_else(|| panic!("{}: no metadata {key}", self.name))
    }

    pub fn f(&self, key: &str) -> f64 {
        self.m(key).parse().unwrap_or_else(|_| panic!("{}: metadata {key} not a number", self.name))
    }
}

/// max|a - b| relative to max(1, max|b|).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let diff: f32 = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    let scale: f32 = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1.0)
}

pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = rel_diff(a, b);
    assert!(d <= tol, "{what}: relative difference {d:e} > {tol:e}");
}
