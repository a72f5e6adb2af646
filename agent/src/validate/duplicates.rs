//! Duplicate JSON keys. serde_json keeps the last of two equal keys without a word, so
//! `{"vcpus": 2, "vcpus": 64}` would silently mean 64: the document is walked once more, as
//! text, and every key that repeats within its object is reported with its path.

use std::collections::BTreeSet;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Every repeated key of `json` (already known to be valid JSON), as the path of the repeat.
pub(super) fn repeated_keys(json: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut path = Vec::new();
    let walk = Walk {
        path: &mut path,
        found: &mut found,
    };
    // Valid JSON walks without error; an error here would only repeat the parser's.
    let _ = walk.deserialize(&mut serde_json::Deserializer::from_str(json));
    found
}

struct Walk<'a> {
    path: &'a mut Vec<String>,
    found: &'a mut Vec<Vec<String>>,
}

impl Walk<'_> {
    fn child(&mut self, key: String) -> Walk<'_> {
        self.path.push(key);
        Walk {
            path: self.path,
            found: self.found,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let mut repeat = self.path.clone();
                repeat.push(key.clone());
                self.found.push(repeat);
            }
            map.next_value_seed(self.child(key))?;
            self.path.pop();
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        while seq
            .next_element_seed(self.child(index.to_string()))?
            .is_some()
        {
            self.path.pop();
            index += 1;
        }
        // The walk pushed the index of the element that turned out not to be there.
        self.path.pop();
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(json: &str) -> Vec<String> {
        repeated_keys(json)
            .into_iter()
            .map(|path| path.join("."))
            .collect()
    }

    #[test]
    fn repeats_are_found_at_every_depth_with_their_path() {
        let json = r#"{"version": 1, "vms": {"web": {"vcpus": 2, "disks": [{"a": 1, "a": 2}],
            "vcpus": 4}}, "version": 1}"#;
        assert_eq!(
            keys(json),
            ["vms.web.disks.0.a", "vms.web.vcpus", "version"]
        );
    }

    #[test]
    fn escaped_spellings_of_one_key_are_one_key() {
        assert_eq!(keys(r#"{"a": 1, "\u0061": 2}"#), ["a"]);
        assert!(keys(r#"{"a": {"b": 1}, "b": {"a": [1, {"b": 2}]}}"#).is_empty());
    }
}
