//! Loading a policy file: naming policies by their `@id`, and wording parse and
//! validation errors with the line each policy starts on.

use super::*;

/// Rebuilds `parsed` with each policy named after its `@id`; rejects templates and empty
/// or duplicate ids.
pub(super) fn rename_by_annotation(
    text: &str,
    parsed: &PolicySet,
) -> Result<PolicySet, AuthzError> {
    let mut problems = Vec::new();
    let lines = policy_lines(text);
    for template in parsed.templates() {
        let id = template
            .annotation(ID_ANNOTATION)
            .map_or_else(|| template.id().to_string(), str::to_owned);
        problems.push(format!(
            "policy `{id}`{}: templates (`?principal`/`?resource` slots) are not supported",
            at_line(&lines, template.id().as_ref())
        ));
    }

    let mut policies = PolicySet::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for policy in parsed.policies() {
        let positional = policy.id().to_string();
        let renamed = match policy.annotation(ID_ANNOTATION) {
            None => policy.clone(),
            Some("") => {
                problems.push(format!(
                    "policy `{positional}`{}: empty @id annotation",
                    at_line(&lines, &positional)
                ));
                continue;
            }
            Some(id) => policy.new_id(PolicyId::new(id)),
        };
        let id = renamed.id().to_string();
        if let Some(first) = seen.get(&id) {
            let (a, b) = ordered(first, &positional);
            problems.push(format!(
                "policy id `{id}` is used twice ({}{} and {}{}){}",
                a,
                at_line(&lines, a),
                b,
                at_line(&lines, b),
                if id.starts_with("policy") {
                    "; an @id may not reuse the positional id of an unannotated policy"
                } else {
                    ""
                }
            ));
            continue;
        }
        seen.insert(id.clone(), positional);
        if let Err(e) = policies.add(renamed) {
            problems.push(format!("policy `{id}`: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(policies)
    } else {
        problems.sort();
        Err(AuthzError::Parse { problems })
    }
}

/// The two positional ids in statement order (for stable messages).
pub(super) fn ordered<'s>(a: &'s str, b: &'s str) -> (&'s str, &'s str) {
    let n = |s: &str| {
        s.strip_prefix("policy")
            .and_then(|d| d.parse::<usize>().ok())
    };
    if n(a) <= n(b) {
        (a, b)
    } else {
        (b, a)
    }
}

/// `policy `id` (line N): message`, without Cedar's own "for policy `id`, " lead-in.
pub(super) fn about_policy(
    lines: &HashMap<String, usize>,
    id: &str,
    message: &dyn fmt::Display,
) -> String {
    let message = message.to_string();
    let message = message
        .strip_prefix(&format!("for policy `{id}`, "))
        .unwrap_or(&message);
    format!("policy `{id}`{}: {message}", at_line(lines, id))
}

/// `" (line N)"` for a policy id found in `lines`, else `""`.
pub(super) fn at_line(lines: &HashMap<String, usize>, id: &str) -> String {
    lines
        .get(id)
        .map_or_else(String::new, |line| format!(" (line {line})"))
}

/// Maps both the positional id (`policy<N>`) and the `@id` of each statement to the line
/// it starts on. Only used to word error messages.
pub(super) fn policy_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    for (index, statement) in statements(text).into_iter().enumerate() {
        if let Ok(policy) = PolicySet::from_str(statement.text) {
            let annotated = policy
                .policies()
                .map(|p| p.annotation(ID_ANNOTATION).map(str::to_owned))
                .chain(
                    policy
                        .templates()
                        .map(|t| t.annotation(ID_ANNOTATION).map(str::to_owned)),
                )
                .next()
                .flatten();
            if let Some(id) = annotated {
                lines.insert(id, statement.line);
            }
        }
        lines.insert(format!("policy{index}"), statement.line);
    }
    lines
}

/// Reports parse errors per statement, with the line it starts on, so that a long file
/// points at the broken policy. Falls back to Cedar's messages for the whole text.
pub(super) fn locate_parse_errors(text: &str, whole: &cedar::ParseErrors) -> Vec<String> {
    let mut problems = Vec::new();
    for (index, statement) in statements(text).into_iter().enumerate() {
        if let Err(errors) = PolicySet::from_str(statement.text) {
            let name = annotated_id(statement.text).unwrap_or_else(|| format!("policy{index}"));
            let mut messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
            messages.dedup();
            problems.push(format!(
                "policy `{name}` (line {}): {}",
                statement.line,
                messages.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        problems = whole.iter().map(ToString::to_string).collect();
    }
    problems
}

/// Best effort: the `@id("…")` of a statement that does not parse.
pub(super) fn annotated_id(statement: &str) -> Option<String> {
    let rest = statement.split_once("@id")?.1.trim_start();
    let rest = rest.strip_prefix('(')?.trim_start().strip_prefix('"')?;
    let (id, _) = rest.split_once('"')?;
    Some(id.to_owned())
}

/// One `;`-terminated statement of a policy text.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Statement<'t> {
    /// 1-based line of the statement's first character that is not blank or comment.
    pub(super) line: usize,
    pub(super) text: &'t str,
}

/// Splits Cedar policy text into statements at each `;` outside string literals and
/// `//` comments. A trailing statement without `;` is kept (Cedar will reject it).
///
/// Why not Cedar's own source locations (cedar-policy 4.14): its parser knows each
/// statement's span, but the public API hands none of them out.
/// - When the text does not parse, `ParseErrors` (miette labels) carries the span of
///   the offending *token* only. The parse tree that holds each statement's span is
///   dropped on the first error, so nothing says which statement failed, where it
///   starts, or what its `@id` is: the messages name all three.
/// - When it parses, `Policy` and `Template` have no location (`to_cedar()` gives the
///   statement's text, not its offset). Only the `#[doc(hidden)]`
///   `AsRef<ast::Policy>` reaches one, in cedar-policy-core's internals, which would
///   need that crate pinned to cedar-policy's exact version.
/// - Validation errors label the offending expression, not the policy, and warnings,
///   templates and duplicate ids have no span at all.
pub(super) fn statements(text: &str) -> Vec<Statement<'_>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Comment,
        Str { escaped: bool },
    }
    let mut out = Vec::new();
    let mut state = State::Code;
    let mut start = 0;
    let mut first_line: Option<usize> = None;
    let mut line = 1;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match state {
            State::Comment => {
                if c == '\n' {
                    state = State::Code;
                }
            }
            State::Str { escaped: true } => state = State::Str { escaped: false },
            State::Str { escaped: false } => match c {
                '\\' => state = State::Str { escaped: true },
                '"' => state = State::Code,
                _ => {}
            },
            State::Code => {
                if c == '/' && chars.peek().map(|&(_, n)| n) == Some('/') {
                    state = State::Comment;
                } else if !c.is_whitespace() {
                    first_line.get_or_insert(line);
                    if c == '"' {
                        state = State::Str { escaped: false };
                    } else if c == ';' {
                        out.push(Statement {
                            line: first_line.take().unwrap_or(line),
                            text: &text[start..=i],
                        });
                        start = i + 1;
                    }
                }
            }
        }
        if c == '\n' {
            line += 1;
        }
    }
    if let Some(line) = first_line {
        out.push(Statement {
            line,
            text: &text[start..],
        });
    }
    out
}

// Compile-time check: an `Authorizer` can be shared between request tasks.
