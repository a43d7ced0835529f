//! # cogvx-metrics (work in progress).
