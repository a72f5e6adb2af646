//! A desired-state document inside a request, kept as the JSON text the client sent so the agent
//! validates it exactly as it validates the file: a key given twice is still there to be refused,
//! which a `serde_json::Value` (last key wins) or a `DesiredState` would have hidden.

use std::fmt;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::spec::DesiredState;

/// Compact JSON text (no newline: requests are one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDocument(String);

impl DesiredDocument {
    pub fn from_state(state: &DesiredState) -> Self {
        Self(serde_json::to_string(state).expect("desired states serialize"))
    }

    /// The text to validate.
    pub fn text(&self) -> &str {
        &self.0
    }
}

impl Serialize for DesiredDocument {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RawValue::from_string(self.0.clone())
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DesiredDocument {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut text = String::new();
        Transcribe(&mut text).deserialize(deserializer)?;
        Ok(Self(text))
    }
}

/// Writes whatever it is fed back out as compact JSON, every key in order, repeats included.
/// (A request is decoded through serde's buffered content, which keeps repeated keys too.)
struct Transcribe<'a>(&'a mut String);

impl<'de> DeserializeSeed<'de> for Transcribe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Transcribe<'_> {
    fn scalar<T: Serialize, E>(self, value: T) -> Result<(), E> {
        self.0
            .push_str(&serde_json::to_string(&value).expect("JSON scalars serialize"));
        Ok(())
    }
}

impl<'de> Visitor<'de> for Transcribe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a desired-state document (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            if !std::mem::take(&mut first) {
                self.0.push(',');
            }
            self.0
                .push_str(&serde_json::to_string(&key).expect("strings serialize"));
            self.0.push(':');
            map.next_value_seed(Transcribe(self.0))?;
        }
        self.0.push('}');
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push('[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(',');
            }
            if seq.next_element_seed(Transcribe(self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(']');
        Ok(())
    }

    fn visit_bool<E>(self, value: bool) -> Result<(), E> {
        self.scalar(value)
    }
    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.scalar(value)
    }
    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.scalar(value)
    }
    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        self.scalar(value)
    }
    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        self.scalar(value)
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::Request;
    use super::*;

    #[test]
    fn a_plan_request_keeps_repeated_keys_for_the_validator() {
        let line = r#"{"request":"plan","desired":{"version":1,"vms":{"a":{"x":[1,-2,2.5,"\"",null,true]},"a":{}},"version":2}}"#;
        let Request::Plan {
            desired: Some(document),
        } = serde_json::from_str::<Request>(line).unwrap()
        else {
            panic!("not a plan request with a document");
        };
        assert_eq!(
            document.text(),
            r#"{"version":1,"vms":{"a":{"x":[1,-2,2.5,"\"",null,true]},"a":{}},"version":2}"#
        );
    }

    #[test]
    fn a_document_goes_out_as_one_line_and_comes_back_equal() {
        let state: DesiredState = serde_json::from_str(r#"{"version":1}"#).unwrap();
        let request = Request::Plan {
            desired: Some(DesiredDocument::from_state(&state)),
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
    }
}
