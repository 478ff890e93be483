//! One line of text for an error and its causes, the form logs and API answers show.
//!
//! reqwest and hyper put the useful part (refused, DNS, TLS) in the causes, not in the top
//! error's message, so both the server client and the token client need the whole chain.

/// `error: cause: cause …`, outermost first.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn names_every_cause_outermost_first() {
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(chain(&e), "outer: connection refused");
    }
}
