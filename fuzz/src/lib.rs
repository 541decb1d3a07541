//! Fuzz targets for hostile input. The properties live in [`checks`], which
//! `tests/hostile_input.rs` also compiles (by path) to replay `fuzz/regressions` in CI.

pub mod checks;
