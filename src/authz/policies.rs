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

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/policies/example.cedar");

    fn validation_problems(text: &str) -> Vec<String> {
        match Authorizer::new(text) {
            Err(AuthzError::Validation { problems }) => problems,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn parse_problems(text: &str) -> Vec<String> {
        match Authorizer::new(text) {
            Err(AuthzError::Parse { problems }) => problems,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn schema_violations_are_rejected_naming_the_policy() {
        let p = validation_problems(
            r#"
            @id("fine") permit (principal, action, resource);
            @id("typo") permit (principal, action, resource) when { context.nosuch == "x" };
            "#,
        );
        // One problem per action the policy applies to, all about `typo`.
        assert_eq!(p.len(), 3, "{p:?}");
        for problem in &p {
            assert!(
                problem.starts_with("policy `typo` (line 3): attribute `nosuch` in context"),
                "{p:?}"
            );
        }

        let p = validation_problems(
            "permit (principal, action == Xks::Action::\"CreateKey\", resource);",
        );
        assert!(p[0].starts_with("policy `policy0` (line 1): "), "{p:?}");
        assert!(p[0].contains("CreateKey"), "{p:?}");

        // An optional field read without `has`.
        let p = validation_problems(
            r#"@id("unguarded") permit (principal, action, resource) when { context.kmsViaService == "s3.amazonaws.com" };"#,
        );
        assert!(p[0].starts_with("policy `unguarded`"), "{p:?}");

        // An unknown entity type.
        let p =
            validation_problems(r#"@id("t") permit (principal is Xks::User, action, resource);"#);
        assert!(p[0].contains("Xks::User"), "{p:?}");

        let err = Authorizer::new(
            r#"@id("x") permit (principal, action, resource) when { resource.nope };"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("Cedar policies do not match the xks-proxy schema: policy `x`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_text_is_rejected_naming_the_statement() {
        let p = parse_problems(
            r#"
            @id("ok") permit (principal, action, resource);

            // a comment with ; and "quotes
            @id("broken")
            permit (principal, action, resource) when { context.fields.contains( };
            "#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("policy `broken` (line 5): "), "{p:?}");

        let p = parse_problems("permit (principal, action, resource)");
        assert!(p[0].starts_with("policy `policy0` (line 1)"), "{p:?}");
        let p = parse_problems("allow everything;");
        assert!(!p.is_empty());
        let p = parse_problems("permit (principal, action, resource) when { \"unterminated };");
        assert!(!p.is_empty());
    }

    #[test]
    fn unsupported_ids_and_templates_are_rejected() {
        let p = parse_problems(
            r#"
            @id("a") permit (principal, action, resource);
            @id("a") forbid (principal, action, resource);
            "#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("`a` is used twice (policy0 (line 2) and policy1 (line 3))"),
            "{p:?}"
        );

        let p = parse_problems(
            r#"
            permit (principal, action, resource);
            @id("policy0") permit (principal, action, resource);
            "#,
        );
        assert!(p[0].contains("positional id"), "{p:?}");

        let p = parse_problems(r#"@id("") permit (principal, action, resource);"#);
        assert!(p[0].contains("empty @id"), "{p:?}");

        let p = parse_problems(r#"@id("tpl") permit (principal == ?principal, action, resource);"#);
        assert!(
            p[0].starts_with("policy `tpl` (line 1): templates"),
            "{p:?}"
        );
    }

    #[test]
    fn from_file_reads_and_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.cedar");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(Authorizer::from_file(&path).unwrap().policy_ids().len(), 5);
        let missing = dir.path().join("missing.cedar");
        let err = Authorizer::from_file(&missing).unwrap_err();
        assert!(matches!(err, AuthzError::Read { .. }));
        assert!(err.to_string().contains("missing.cedar"), "{err}");
    }

    #[test]
    fn statement_splitting() {
        let text = "// c;\n@id(\"a;b\") permit (principal, action, resource) when { \"\\\";\" == \"x\" };\n\n  forbid (principal, action, resource)\n;\ntrailing";
        let s = statements(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].line, 2);
        assert!(s[0].text.ends_with("== \"x\" };"));
        assert_eq!(s[1].line, 4);
        assert_eq!(s[1].text.trim(), "forbid (principal, action, resource)\n;");
        assert_eq!(
            s[2],
            Statement {
                line: 6,
                text: "\ntrailing"
            }
        );
        assert!(statements("  // only a comment\n\n").is_empty());
        assert_eq!(annotated_id(s[0].text).as_deref(), Some("a;b"));
    }

    #[test]
    fn statement_lines_follow_cedar_numbering() {
        // `policy_lines` assumes Cedar numbers statements as `statements` splits them.
        let lines = policy_lines(EXAMPLE);
        let parsed = PolicySet::from_str(EXAMPLE).unwrap();
        for p in parsed.policies() {
            let id = p.annotation(ID_ANNOTATION).unwrap();
            assert_eq!(lines.get(id), lines.get(&p.id().to_string()), "{id}");
            assert!(lines.contains_key(id));
        }
        assert_eq!(parsed.policies().count(), statements(EXAMPLE).len());
    }
}
