//! Rust v0 symbol names, shortened for the report.

/// `_RNvNtCs7ejwpq4MZjP_4mesh2lb8new_flow` -> `lb::new_flow` (Rust v0 mangling, crate
/// dropped, generic arguments dropped); anything else as it is.
pub(super) fn demangle(sym: &str) -> String {
    let Some(rest) = sym.strip_prefix("_R") else {
        return sym.to_string();
    };
    let mut p = V0 {
        s: rest.as_bytes(),
        i: 0,
    };
    match p.path(true) {
        Some(segs) if segs.len() > 1 => segs[1..].join("::"),
        Some(segs) if !segs.is_empty() => segs.join("::"),
        _ => sym.to_string(),
    }
}

struct V0<'a> {
    s: &'a [u8],
    i: usize,
}

impl V0<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn path(&mut self, top: bool) -> Option<Vec<String>> {
        match self.next()? {
            b'C' => Some(vec![self.ident()?]),
            b'N' => {
                let ns = self.next()?;
                let mut p = self.path(false)?;
                let id = self.ident()?;
                p.push(match (ns, id.is_empty()) {
                    (b'C', true) => "{closure}".to_string(),
                    (_, true) => "{anon}".to_string(),
                    _ => id,
                });
                Some(p)
            }
            // Generic instantiation: the path is enough (arguments follow, then `E`).
            b'I' if top => self.path(false),
            _ => None,
        }
    }

    fn ident(&mut self) -> Option<String> {
        if self.peek() == Some(b's') {
            self.i += 1;
            while self.next()? != b'_' {}
        }
        if self.peek() == Some(b'u') {
            self.i += 1;
        }
        let start = self.i;
        while self.peek()?.is_ascii_digit() {
            self.i += 1;
        }
        let len: usize = std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()?;
        if self.peek() == Some(b'_') {
            self.i += 1;
        }
        let id = self.s.get(self.i..self.i + len)?;
        self.i += len;
        String::from_utf8(id.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_v0() {
        assert_eq!(
            demangle("_RNvNtCs7ejwpq4MZjP_4mesh2lb8new_flow"),
            "lb::new_flow"
        );
        assert_eq!(
            demangle("_RINvNtCs7ejwpq4MZjP_4mesh8datapath18parse_into_scratchNtNtB4_3pkt12DirectPacketEB4_"),
            "datapath::parse_into_scratch"
        );
        assert_eq!(demangle("memset"), "memset");
        assert_eq!(demangle("_Rbroken"), "_Rbroken");
    }
}
