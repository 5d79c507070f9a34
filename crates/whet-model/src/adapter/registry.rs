//! The named adapters a model applies beside its base (`--adapter NAME=DIR`, the server's
//! per-request adapters): their names, the ids their projections' matrices carry, and their
//! current weights. The matrices live in the projections (`layers::linear::NamedLora`); this is
//! the bookkeeping that turns a name into them, kept out of the model's wiring.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A weight shared by every projection a named adapter wraps (`f64` bits; 0 = off), so that
/// switching adapters needs no `&mut` model.
pub(crate) type AdapterWeight = Arc<AtomicU64>;

/// One registered adapter.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    id: usize,
    weight: AdapterWeight,
}

/// Named adapters by name, in the order they were added.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
    /// The id the next adapter gets: ids are never reused, so a request that names a removed
    /// adapter cannot pick up its successor.
    next_id: usize,
}

impl Registry {
    /// Register `name` at `weight`: its id and the weight cell its projections share.
    pub(crate) fn add(&mut self, name: &str, weight: f64) -> Result<(usize, AdapterWeight)> {
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::Lora(format!("two adapters are named `{name}`")));
        }
        check_weight(name, weight)?;
        let (id, cell) = (self.next_id, Arc::new(AtomicU64::new(weight.to_bits())));
        self.entries.push(Entry { name: name.to_string(), id, weight: cell.clone() });
        self.next_id += 1;
        Ok((id, cell))
    }

    /// Unregister `name`; its id.
    pub(crate) fn remove(&mut self, name: &str) -> Result<usize> {
        let id = self.id(name)?;
        self.entries.retain(|e| e.id != id);
        Ok(id)
    }

    /// The id of `name`; an unknown name is [`Error::UnknownAdapter`], listing the known ones.
    pub(crate) fn id(&self, name: &str) -> Result<usize> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.id)
            .ok_or_else(|| Error::UnknownAdapter { name: name.to_string(), loaded: self.names() })
    }

    /// Whether no adapter is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The names, in the order they were added.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The names and current weights, in the order they were added.
    pub fn weights(&self) -> Vec<(String, f64)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), f64::from_bits(e.weight.load(Ordering::Relaxed))))
            .collect()
    }

    /// Set every adapter's weight: those in `weights` get theirs, the others 0 (off). Nothing
    /// changes when a name is unknown or a weight unusable.
    pub fn set_weights(&self, weights: &[(&str, f64)]) -> Result<()> {
        for (name, w) in weights {
            self.id(name)?;
            check_weight(name, *w)?;
        }
        for e in &self.entries {
            let w = weights.iter().find(|(name, _)| *name == e.name).map_or(0.0, |(_, w)| *w);
            e.weight.store(w.to_bits(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The ids of a row's `(name, weight)` choice, its weights checked.
    pub(crate) fn resolve(&self, choice: &[(String, f64)]) -> Result<Vec<(usize, f64)>> {
        choice
            .iter()
            .map(|(name, w)| {
                check_weight(name, *w)?;
                Ok((self.id(name)?, *w))
            })
            .collect()
    }
}

/// An adapter weight is applied in the model's dtype (f32 at most): one that is not a finite
/// f32 (`NaN`, `inf`, `1e39`) would turn every output into NaN, so it is refused where it
/// enters, whichever door it came through (a flag, the API, a chat command).
fn check_weight(name: &str, weight: f64) -> Result<()> {
    if (weight as f32).is_finite() {
        Ok(())
    } else {
        Err(Error::Lora(format!("adapter `{name}`: weight `{weight}` is not a finite f32 number")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_weights() {
        let mut r = Registry::default();
        let (a, _) = r.add("style", 1.0).unwrap();
        let (b, cell) = r.add("tone", 0.5).unwrap();
        assert_ne!(a, b);
        assert!(r.add("style", 1.0).unwrap_err().to_string().contains("two adapters"));
        assert!(r.add("x", f64::NAN).is_err() && r.names() == ["style", "tone"]);
        r.set_weights(&[("tone", 2.0)]).unwrap();
        assert_eq!(r.weights(), [("style".to_string(), 0.0), ("tone".to_string(), 2.0)]);
        assert_eq!(f64::from_bits(cell.load(Ordering::Relaxed)), 2.0);
        // An unknown name changes nothing and is a typed error naming the loaded ones.
        match r.set_weights(&[("tone", 1.0), ("nope", 1.0)]).unwrap_err() {
            Error::UnknownAdapter { name, loaded } => {
                assert_eq!((name.as_str(), loaded), ("nope", vec!["style".into(), "tone".into()]))
            }
            e => panic!("{e}"),
        }
        assert_eq!(r.weights()[1].1, 2.0);
        // Ids are not reused after a removal.
        assert_eq!(r.remove("style").unwrap(), a);
        let (c, _) = r.add("style", 1.0).unwrap();
        assert!(c != a && c != b);
        assert_eq!(r.resolve(&[("tone".into(), 0.3)]).unwrap(), [(b, 0.3)]);
    }
}
