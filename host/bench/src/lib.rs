//! # cogvx-bench (work in progress).
