//! Skill routing: which of an agent's skills answers a message. An `@skill:NAME` prefix picks one explicitly
//! (and is stripped from the stored message); otherwise keywords score each skill and the best one above the
//! threshold wins; no match keeps the agent's defaults.
//!
//! Scored matching by embeddings or a classifier call needs a provider that offers one; neither of ours does
//! yet, so the keyword scorer is the router (see ARCHITECTURE.md).

use crate::config::{AgentSettings, Config, SkillSettings};

/// The least confidence a keyword match needs.
pub const KEYWORD_THRESHOLD: f64 = 0.5;

/// The outcome of routing one message.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// The message without an `@skill:` prefix.
    pub content: String,
    pub skill: Option<SkillMatch>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SkillMatch {
    pub skill: SkillSettings,
    /// `explicit` or `keyword`.
    pub method: &'static str,
    pub confidence: f64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RoutingError {
    /// `@skill:NAME` names no skill of this agent.
    UnknownSkill(String),
}

/// Routes `content` for `agent`.
pub fn route(
    config: &Config,
    agent: &AgentSettings,
    content: &str,
) -> Result<Routing, RoutingError> {
    let skills: Vec<&SkillSettings> = agent
        .skills
        .iter()
        .filter_map(|n| config.skill(n))
        .collect();
    if let Some(rest) = content.strip_prefix("@skill:") {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let name = &rest[..end];
        let Some(skill) = skills.iter().find(|s| s.name == name) else {
            return Err(RoutingError::UnknownSkill(name.to_string()));
        };
        return Ok(Routing {
            content: rest[end..].trim_start().to_string(),
            skill: Some(SkillMatch {
                skill: (*skill).clone(),
                method: "explicit",
                confidence: 1.0,
            }),
        });
    }
    let lower = content.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut best: Option<(usize, &SkillSettings)> = None;
    for skill in &skills {
        let hits = skill
            .keywords
            .iter()
            .filter(|k| {
                if k.contains(' ') {
                    lower.contains(k.as_str())
                } else {
                    words.contains(&k.as_str())
                }
            })
            .count();
        if hits > 0 && best.is_none_or(|(b, _)| hits > b) {
            best = Some((hits, skill));
        }
    }
    let skill = best.and_then(|(hits, skill)| {
        // 1 hit -> 0.5, 2 -> 0.75, 3 -> 0.875: more evidence, more confidence, never certainty.
        let confidence = 1.0 - 0.5f64.powi(hits as i32);
        (confidence >= KEYWORD_THRESHOLD).then(|| SkillMatch {
            skill: skill.clone(),
            method: "keyword",
            confidence,
        })
    });
    Ok(Routing {
        content: content.to_string(),
        skill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[providers.p]
kind = "openai"
base_url = "http://x/v1"
[[agents]]
name = "a"
provider = "p"
model = "m"
skills = ["math", "poet"]
[[skills]]
name = "math"
keywords = ["calculate", "sum", "compute"]
[[skills]]
name = "poet"
keywords = ["poem", "rhyme"]
"#,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn explicit_prefix_is_stripped() {
        let c = config();
        let r = route(&c, &c.agents[0], "@skill:poet write about rain").unwrap();
        assert_eq!(r.content, "write about rain");
        let m = r.skill.unwrap();
        assert_eq!(
            (m.skill.name.as_str(), m.method, m.confidence),
            ("poet", "explicit", 1.0)
        );
        assert_eq!(
            route(&c, &c.agents[0], "@skill:nope hi"),
            Err(RoutingError::UnknownSkill("nope".into()))
        );
    }

    #[test]
    fn keywords_pick_the_best_skill() {
        let c = config();
        let r = route(&c, &c.agents[0], "Please calculate the sum of 2 and 3").unwrap();
        let m = r.skill.unwrap();
        assert_eq!(
            (m.skill.name.as_str(), m.method, m.confidence),
            ("math", "keyword", 0.75)
        );
        assert!(route(&c, &c.agents[0], "hello there")
            .unwrap()
            .skill
            .is_none());
        // Whole words only: "summary" is not "sum".
        assert!(route(&c, &c.agents[0], "a summary please")
            .unwrap()
            .skill
            .is_none());
    }
}
