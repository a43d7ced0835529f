//! Aspect-ratio and length buckets (`[data] buckets`).
//!
//! A clip trains at one of a list of resolutions, its *bucket*: the bucket nearest its aspect
//! ratio (distance `|ln(clip aspect / bucket aspect)|`), then the longest, then the largest of
//! those, that the video transforms can fill from it: their plan for the bucket must select at
//! least the bucket's frames, produce exactly its size, and not upscale the kept region more
//! than `max_upscale`. A clip no bucket fits is dropped (and named). Each training batch then
//! holds one bucket.
//!
//! With no `[data] buckets` the list is the one `[data] resolution` ([`Buckets::single`]) and
//! every clip is planned for it, as the official finetune resizes every clip to its resolution.

use cogvx_plugin_api::{ClipInfo, Resolution, TransformPlan};
use cogvx_video::VideoTransforms;

/// The resolutions clips train at, and how far a clip may be upscaled to reach one.
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    list: Vec<Resolution>,
    max_upscale: Option<f64>,
    bucketed: bool,
}

impl From<Resolution> for Buckets {
    fn from(r: Resolution) -> Self {
        Buckets::single(r)
    }
}

impl From<&Buckets> for Buckets {
    fn from(b: &Buckets) -> Self {
        b.clone()
    }
}

/// Where a clip goes: its bucket and the plan the video transforms made for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The bucket.
    pub bucket: Resolution,
    /// The transforms' plan for the bucket.
    pub plan: TransformPlan,
    /// Share of the clip's frame area the plan crops away (0 = whole frame kept).
    pub cropped: f64,
    /// How much the kept region is scaled up to the bucket's size (below 1: scaled down).
    pub upscale: f64,
}

/// The aspect ratios (`width / height`) of `buckets = "auto"`, besides the resolution's own
/// and its portrait/landscape flip.
pub const AUTO_ASPECTS: [f64; 5] = [1.0, 4.0 / 3.0, 3.0 / 4.0, 16.0 / 9.0, 9.0 / 16.0];

impl Buckets {
    /// The single training resolution (no `[data] buckets`): no upscale limit.
    pub fn single(resolution: Resolution) -> Self {
        Buckets {
            list: vec![resolution],
            max_upscale: None,
            bucketed: false,
        }
    }

    /// A bucket list as `[data] buckets` gives it (each already a valid [`Resolution`]);
    /// `max_upscale` as `[data] max_upscale` (default 1: never upscaled). The error says what
    /// to change.
    pub fn new(list: Vec<Resolution>, max_upscale: Option<f64>) -> Result<Self, String> {
        if list.is_empty() {
            return Err(
                "[data] buckets is empty: list at least one FRAMESxHEIGHTxWIDTH, or write \"auto\""
                    .into(),
            );
        }
        for (i, b) in list.iter().enumerate() {
            if list[..i].contains(b) {
                return Err(format!("[data] buckets lists {b} twice"));
            }
        }
        Ok(Buckets {
            list,
            max_upscale: Some(check_upscale(max_upscale.unwrap_or(1.0))?),
            bucketed: true,
        })
    }

    /// `buckets = "auto"`: for each aspect ratio of [`AUTO_ASPECTS`] plus `budget`'s own and its
    /// flip, the largest size (sides multiples of 16) with at most `budget`'s pixels, at
    /// `budget`'s frame count and each halving of it down to 9 frames (8N+1: 49, 25, 9).
    pub fn auto(budget: Resolution, max_upscale: Option<f64>) -> Result<Self, String> {
        let pixels = budget.height as u64 * budget.width as u64;
        let own = budget.width as f64 / budget.height as f64;
        let mut aspects = vec![own, 1.0 / own];
        aspects.extend(AUTO_ASPECTS);
        let mut frames = vec![budget.frames];
        while let Some(&f) = frames.last() {
            let next = 8 * ((f - 1) / 16) + 1;
            if next >= f || next < 9 {
                break;
            }
            frames.push(next);
        }
        let mut list = Vec::new();
        for &f in &frames {
            for &a in &aspects {
                let (height, width) = if (a - own).abs() < 1e-12 {
                    (budget.height, budget.width)
                } else {
                    size_for_aspect(a, pixels)
                };
                let r = Resolution {
                    frames: f,
                    height,
                    width,
                };
                if !list.contains(&r) {
                    list.push(r);
                }
            }
        }
        Self::new(list, max_upscale)
    }

    /// The resolutions, in the order given.
    pub fn list(&self) -> &[Resolution] {
        &self.list
    }

    /// Whether this is a `[data] buckets` list rather than the single training resolution.
    pub fn is_bucketed(&self) -> bool {
        self.bucketed
    }

    /// The upscale limit (`None`: none, the single resolution's default).
    pub fn max_upscale(&self) -> Option<f64> {
        self.max_upscale
    }

    /// The same list with another upscale limit (`[data] max_upscale` with a single
    /// resolution).
    pub fn with_max_upscale(mut self, max_upscale: Option<f64>) -> Result<Self, String> {
        self.max_upscale = match max_upscale {
            Some(m) => Some(check_upscale(m)?),
            None if self.bucketed => Some(1.0),
            None => None,
        };
        Ok(self)
    }

    /// Whether a clip's resolution depends on the clip (a bucket list, or an upscale limit
    /// that can drop a clip); otherwise every clip is planned for the one resolution.
    pub fn needs_assignment(&self) -> bool {
        self.bucketed || self.max_upscale.is_some()
    }

    /// The bucket with the most pixels per clip (frames x height x width; the first such in
    /// the list): what validation and `cogvx plan` use.
    pub fn largest(&self) -> Resolution {
        let mut best = self.list[0];
        for &b in &self.list[1..] {
            if tokens(b) > tokens(best) {
                best = b;
            }
        }
        best
    }

    /// The buckets in the order a clip of `clip`'s aspect ratio tries them: nearest aspect
    /// ratio first, then most frames, then most pixels, then list order.
    pub fn preference(&self, clip: &ClipInfo) -> Vec<Resolution> {
        let aspect = clip.width.max(1) as f64 / clip.height.max(1) as f64;
        let mut order: Vec<(usize, Resolution)> = self.list.iter().copied().enumerate().collect();
        let distance = |b: &Resolution| {
            // Rounded, so that buckets of one aspect ratio (sides rounded to 16) tie.
            let d = (aspect / (b.width as f64 / b.height as f64)).ln().abs();
            (d * 1e3).round() as i64
        };
        order.sort_by_key(|(i, b)| {
            (
                distance(b),
                std::cmp::Reverse(b.frames),
                std::cmp::Reverse(b.height as u64 * b.width as u64),
                *i,
            )
        });
        order.into_iter().map(|(_, b)| b).collect()
    }

    /// The bucket of a clip (see the module doc), planned with `transforms` and `seed`. The
    /// error says why no bucket fits (for one bucket, why that one does not), or that the
    /// transforms planned a size outside the list.
    pub fn assign(
        &self,
        clip: &ClipInfo,
        transforms: &mut VideoTransforms<'_>,
        seed: u64,
    ) -> Result<Assignment, String> {
        let mut reasons = Vec::new();
        for bucket in self.preference(clip) {
            match self.fit(clip, bucket, transforms, seed)? {
                Ok(a) => return Ok(a),
                Err(why) => reasons.push((bucket, why)),
            }
        }
        if reasons.len() == 1 {
            return Err(reasons.remove(0).1);
        }
        Err(format!(
            "fits no bucket ({}x{}, {} frames): {}",
            clip.width,
            clip.height,
            clip.frame_count,
            reasons
                .iter()
                .map(|(b, why)| format!("{b}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }

    /// [`Buckets::assign`] for a clip file (its `range` of frames): probes the file first.
    pub fn assign_file(
        &self,
        path: &std::path::Path,
        range: Option<cogvx_plugin_api::FrameRange>,
        transforms: &mut VideoTransforms<'_>,
        seed: u64,
    ) -> Result<Assignment, String> {
        let clip = cogvx_video::VideoReader::open(path)
            .and_then(|r| r.clip_info(range))
            .map_err(|e| e.to_string())?;
        self.assign(&clip, transforms, seed)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether `bucket` fits the clip (inner `Err`: why not); the outer `Err` is a plan whose
    /// size is no bucket of the list.
    fn fit(
        &self,
        clip: &ClipInfo,
        bucket: Resolution,
        transforms: &mut VideoTransforms<'_>,
        seed: u64,
    ) -> Result<Result<Assignment, String>, String> {
        let plan = match transforms.plan(clip, bucket, seed) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e.to_string())),
        };
        if (plan.frames.len() as u64) < bucket.frames as u64 {
            let untouched = plan.frames.iter().copied().eq(0..clip.frame_count);
            let how = if untouched {
                " (no plugin in the chain selects frames, so the raw frame count applies)"
            } else {
                " after frame selection"
            };
            let what = if self.bucketed {
                "the bucket"
            } else {
                "the target resolution"
            };
            return Ok(Err(format!(
                "clip too short: {} frames{how}, {what} {bucket} needs {}",
                plan.frames.len(),
                bucket.frames
            )));
        }
        let (rw, rh) = plan
            .crop
            .map(|c| (c.width, c.height))
            .unwrap_or((clip.width, clip.height));
        let (ow, oh) = plan.resize.map(|s| (s.width, s.height)).unwrap_or((rw, rh));
        if self.bucketed && (ow, oh) != (bucket.width, bucket.height) {
            if !self.list.iter().any(|b| (b.width, b.height) == (ow, oh)) {
                return Err(format!(
                    "the video transforms ({}) planned {oh}x{ow} (height x width) for bucket {bucket}, a size no bucket of [data] buckets has; \
                     let crop_resize size clips to the bucket (leave its width/height unset)",
                    transforms.names().join(", ")
                ));
            }
            return Ok(Err(format!(
                "the video transforms planned {oh}x{ow} (height x width) for it"
            )));
        }
        let upscale =
            (bucket.width as f64 / rw.max(1) as f64).max(bucket.height as f64 / rh.max(1) as f64);
        if let Some(limit) = self.max_upscale {
            if upscale > limit * (1.0 + 1e-9) {
                return Ok(Err(format!(
                    "the kept {rw}x{rh} region would be upscaled {upscale:.2}x, more than [data] max_upscale = {limit}"
                )));
            }
        }
        let cropped =
            1.0 - (rw as f64 * rh as f64) / (clip.width.max(1) as f64 * clip.height.max(1) as f64);
        Ok(Ok(Assignment {
            bucket,
            plan,
            cropped: cropped.max(0.0),
            upscale,
        }))
    }
}

/// Pixels per clip: frames x height x width.
pub fn tokens(r: Resolution) -> u64 {
    r.frames as u64 * r.height as u64 * r.width as u64
}

fn check_upscale(m: f64) -> Result<f64, String> {
    if m.is_finite() && m >= 1.0 {
        Ok(m)
    } else {
        Err(format!(
            "[data] max_upscale = {m}: write a number >= 1 (1 = never upscale a clip, 2 = at most twice its size)"
        ))
    }
}

/// The largest `(height, width)`, multiples of 16, with at most `pixels` pixels and an aspect
/// ratio within 2% of `aspect` (the nearest one if none is that close).
fn size_for_aspect(aspect: f64, pixels: u64) -> (u32, u32) {
    let mut best: Option<(f64, u64, u32, u32)> = None;
    let mut h = 16u32;
    while (h as u64) * 16 <= pixels {
        let w = ((h as f64 * aspect / 16.0).round() as u32).max(1) * 16;
        if h as u64 * w as u64 <= pixels {
            let off = ((w as f64 / h as f64) / aspect).ln().abs();
            // Within 2%: compare by size; otherwise by distance.
            let key = if off <= 0.02 { 0.0 } else { off };
            let area = h as u64 * w as u64;
            let better = match best {
                None => true,
                Some((k, a, _, _)) => key < k || (key == k && area > a),
            };
            if better {
                best = Some((key, area, h, w));
            }
        }
        h += 16;
    }
    best.map(|(_, _, h, w)| (h, w)).unwrap_or((16, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Resolution {
        s.parse().unwrap()
    }

    fn clip(width: u32, height: u32, frame_count: u32) -> ClipInfo {
        ClipInfo {
            width,
            height,
            frame_count,
            fps: 8.0,
        }
    }

    #[test]
    fn auto_buckets_keep_the_budget() {
        let b = Buckets::auto(r("49x480x720"), None).unwrap();
        assert!(b.is_bucketed());
        assert_eq!(b.max_upscale(), Some(1.0));
        assert_eq!(b.list()[0], r("49x480x720"));
        assert!(b.list().contains(&r("49x720x480")));
        assert!(b.list().contains(&r("49x576x576")));
        assert!(b.list().contains(&r("49x432x768")), "{:?}", b.list());
        assert!(b.list().contains(&r("25x480x720")));
        assert!(b.list().contains(&r("9x480x720")));
        for x in b.list() {
            assert!(x.height as u64 * x.width as u64 <= 480 * 720, "{x}");
            assert_eq!((x.frames - 1) % 8, 0);
            assert_eq!((x.height % 16, x.width % 16), (0, 0));
        }
        assert_eq!(b.largest(), r("49x480x720"));
        let frames: std::collections::BTreeSet<u32> = b.list().iter().map(|x| x.frames).collect();
        assert_eq!(frames.into_iter().collect::<Vec<_>>(), vec![9, 25, 49]);
        // A 9-frame budget has one length.
        assert!(Buckets::auto(r("9x64x96"), None)
            .unwrap()
            .list()
            .iter()
            .all(|x| x.frames == 9));
    }

    #[test]
    fn bad_lists_and_limits_are_named() {
        let e = Buckets::new(vec![], None).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = Buckets::new(vec![r("9x64x96"), r("9x64x96")], None).unwrap_err();
        assert!(e.contains("9x64x96 twice"), "{e}");
        for m in [0.5, f64::NAN, f64::INFINITY] {
            let e = Buckets::new(vec![r("9x64x96")], Some(m)).unwrap_err();
            assert!(e.contains("max_upscale"), "{e}");
        }
        let single = Buckets::single(r("9x64x96"));
        assert!(!single.needs_assignment());
        assert!(single
            .clone()
            .with_max_upscale(Some(2.0))
            .unwrap()
            .needs_assignment());
    }

    #[test]
    fn preference_is_aspect_then_length_then_size() {
        let b = Buckets::new(
            vec![
                r("9x64x96"),
                r("17x64x96"),
                r("9x64x64"),
                r("9x96x64"),
                r("9x32x48"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            b.preference(&clip(640, 272, 100)),
            vec![
                r("17x64x96"),
                r("9x64x96"),
                r("9x32x48"),
                r("9x64x64"),
                r("9x96x64")
            ]
        );
        assert_eq!(b.preference(&clip(256, 256, 100))[0], r("9x64x64"));
        assert_eq!(b.preference(&clip(120, 176, 100))[0], r("9x96x64"));
        assert_eq!(b.largest(), r("17x64x96"));
    }
}
