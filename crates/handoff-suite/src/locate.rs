//! Maps field paths (`models[1].source.onnx`) to line:column in the YAML
//! text, so errors found after parsing (a missing model file, a reference
//! backend not in the list) still point at the right place.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

#[derive(Default)]
pub struct Locator {
    positions: HashMap<String, Location>,
}

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

#[derive(Default)]
struct Recorder {
    stack: Vec<Frame>,
    positions: HashMap<String, Location>,
    /// A block mapping's start mark can sit past its first key; the first
    /// key's own mark stands for the mapping instead.
    pending_map: Option<String>,
}

impl Recorder {
    fn path(&self) -> String {
        let mut out = String::new();
        for f in &self.stack {
            match f {
                Frame::Map { key: Some(k) } => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Frame::Map { key: None } => {}
                Frame::Seq { index } => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }

    /// Called for every node that is a value (not a mapping key).
    fn value_at(&mut self, mark: Marker) {
        let path = self.path();
        self.positions.entry(path).or_insert(Location {
            line: mark.line(),
            column: mark.col() + 1,
        });
    }

    /// After a value: a mapping waits for its next key, a sequence moves on.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None }))
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                if self.expecting_key() {
                    if let Some(path) = self.pending_map.take() {
                        self.positions.entry(path).or_insert(Location {
                            line: mark.line(),
                            column: mark.col() + 1,
                        });
                    }
                    if let Some(Frame::Map { key }) = self.stack.last_mut() {
                        *key = Some(value);
                    }
                    // A key's own position stands for its value until the
                    // value is seen (useful when the value is a block).
                    let path = self.path();
                    self.positions.insert(
                        format!("{path}#key"),
                        Location {
                            line: mark.line(),
                            column: mark.col() + 1,
                        },
                    );
                } else {
                    self.value_at(mark);
                    self.value_done();
                }
            }
            Event::MappingStart(..) => {
                self.pending_map = Some(self.path());
                self.stack.push(Frame::Map { key: None });
            }
            Event::SequenceStart(..) => {
                self.value_at(mark);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.pending_map = None;
                self.stack.pop();
                self.value_done();
            }
            Event::Alias(_) => {
                self.value_at(mark);
                self.value_done();
            }
            _ => {}
        }
    }
}

impl Locator {
    /// Builds the map; a text that does not parse yields an empty locator
    /// (serde will have reported the syntax error with its own location).
    pub fn new(text: &str) -> Self {
        let mut rec = Recorder::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut rec, false);
        Self {
            positions: rec.positions,
        }
    }

    /// The position of the key naming `path` if there is one, else of its
    /// value, else of the nearest ancestor that exists.
    pub fn find(&self, path: &str) -> Option<Location> {
        let mut p = path.to_owned();
        loop {
            if let Some(l) = self.positions.get(&format!("{p}#key")) {
                return Some(*l);
            }
            if let Some(l) = self.positions.get(&p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_paths() {
        let text = "name: x\nmodels:\n  - id: a\n    source:\n      onnx: a.onnx\n  - id: b\nthreads: [1, 2]\n";
        let loc = Locator::new(text);
        assert_eq!(loc.find("name"), Some(Location { line: 1, column: 1 }));
        assert_eq!(
            loc.find("models[0].source.onnx"),
            Some(Location { line: 5, column: 7 })
        );
        assert_eq!(
            loc.find("models[1].id"),
            Some(Location { line: 6, column: 5 })
        );
        assert_eq!(
            loc.find("threads[1]"),
            Some(Location {
                line: 7,
                column: 14
            })
        );
        // Unknown leaf: falls back to the nearest ancestor.
        assert_eq!(
            loc.find("models[1].inputs"),
            Some(Location { line: 6, column: 5 })
        );
    }
}
