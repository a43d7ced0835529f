//! cogvx training core (in progress).
