//! A small OData `$filter` parser and evaluator: `eq ne gt ge lt le`, `and or not`,
//! parentheses, `contains` / `startswith` / `endswith`, string literals with
//! doubled quotes, numbers, GUIDs, `true` / `false` / `null`. String comparison is
//! case-insensitive, as in Dataverse.

use std::cmp::Ordering;

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Compare(String, Op, Literal),
    Function(Function, String, String),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Function {
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Text(String),
    Number(f64),
    Bool(bool),
    Null,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Open,
    Close,
    Comma,
}

fn tokenize(input: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = input.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            '(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                i += 1;
            }
            '\'' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            text.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            text.push(other);
                            i += 1;
                        }
                    }
                }
                tokens.push(Token::Text(text));
            }
            _ => {
                let start = i;
                while i < chars.len() && !matches!(chars[i], ' ' | '\t' | '(' | ')' | ',' | '\'') {
                    i += 1;
                }
                tokens.push(Token::Word(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    position: usize,
}

pub fn parse(input: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        tokens: tokenize(input)?,
        position: 0,
    };
    let expr = parser.or()?;
    if parser.position != parser.tokens.len() {
        return Err(format!(
            "unexpected token {:?}",
            parser.tokens[parser.position]
        ));
    }
    Ok(expr)
}

impl Parser {
    fn peek_word(&self, word: &str) -> bool {
        matches!(self.tokens.get(self.position), Some(Token::Word(w)) if w == word)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn expect(&mut self, expected: Token) -> Result<(), String> {
        match self.next() {
            Some(token) if token == expected => Ok(()),
            other => Err(format!("expected {expected:?}, found {other:?}")),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.position += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.position += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word("not") {
            self.position += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.tokens.get(self.position) == Some(&Token::Open) {
            self.position += 1;
            let inner = self.or()?;
            self.expect(Token::Close)?;
            return Ok(inner);
        }
        let Some(Token::Word(name)) = self.next() else {
            return Err("expected a column name or function".into());
        };
        let function = match name.as_str() {
            "contains" => Some(Function::Contains),
            "startswith" => Some(Function::StartsWith),
            "endswith" => Some(Function::EndsWith),
            _ => None,
        };
        if let Some(function) = function {
            self.expect(Token::Open)?;
            let Some(Token::Word(column)) = self.next() else {
                return Err(format!("{name}() needs a column"));
            };
            self.expect(Token::Comma)?;
            let Some(Token::Text(text)) = self.next() else {
                return Err(format!("{name}() needs a string literal"));
            };
            self.expect(Token::Close)?;
            return Ok(Expr::Function(function, column, text));
        }
        let op = match self.next() {
            Some(Token::Word(op)) => match op.as_str() {
                "eq" => Op::Eq,
                "ne" => Op::Ne,
                "gt" => Op::Gt,
                "ge" => Op::Ge,
                "lt" => Op::Lt,
                "le" => Op::Le,
                other => return Err(format!("unknown operator `{other}`")),
            },
            other => {
                return Err(format!(
                    "expected an operator after `{name}`, found {other:?}"
                ));
            }
        };
        let literal = match self.next() {
            Some(Token::Text(text)) => Literal::Text(text),
            Some(Token::Word(word)) => match word.as_str() {
                "null" => Literal::Null,
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                other => match other.parse::<f64>() {
                    Ok(number) => Literal::Number(number),
                    // GUIDs and dates are written bare.
                    Err(_) => Literal::Text(other.to_owned()),
                },
            },
            other => return Err(format!("expected a value after `{name}`, found {other:?}")),
        };
        Ok(Expr::Compare(name, op, literal))
    }
}

pub fn matches(expr: &Expr, row: &Map<String, Value>) -> bool {
    match expr {
        Expr::And(a, b) => matches(a, row) && matches(b, row),
        Expr::Or(a, b) => matches(a, row) || matches(b, row),
        Expr::Not(inner) => !matches(inner, row),
        Expr::Function(function, column, needle) => {
            let Some(Value::String(text)) = row.get(column) else {
                return false;
            };
            let (text, needle) = (text.to_lowercase(), needle.to_lowercase());
            match function {
                Function::Contains => text.contains(&needle),
                Function::StartsWith => text.starts_with(&needle),
                Function::EndsWith => text.ends_with(&needle),
            }
        }
        Expr::Compare(column, op, literal) => {
            let value = row.get(column).unwrap_or(&Value::Null);
            let ordering = match (value, literal) {
                (Value::Null, Literal::Null) => Some(Ordering::Equal),
                (Value::Null, _) | (_, Literal::Null) => None,
                (Value::String(a), Literal::Text(b)) => {
                    Some(a.to_lowercase().cmp(&b.to_lowercase()))
                }
                (Value::Number(a), Literal::Number(b)) => a.as_f64().and_then(|a| a.partial_cmp(b)),
                (Value::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
                _ => None,
            };
            match (op, ordering) {
                (Op::Eq, Some(o)) => o == Ordering::Equal,
                (Op::Ne, Some(o)) => o != Ordering::Equal,
                (Op::Ne, None) => true,
                (Op::Gt, Some(o)) => o == Ordering::Greater,
                (Op::Ge, Some(o)) => o != Ordering::Less,
                (Op::Lt, Some(o)) => o == Ordering::Less,
                (Op::Le, Some(o)) => o != Ordering::Greater,
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn phone_lookup_filter() {
        let expr = parse("telephone1 eq '+12065550137' or mobilephone eq '+12065550137'").unwrap();
        assert!(matches(
            &expr,
            &row(json!({"telephone1": null, "mobilephone": "+12065550137"}))
        ));
        assert!(!matches(&expr, &row(json!({"telephone1": " 12065550137"}))));
    }

    #[test]
    fn quotes_functions_and_precedence() {
        let expr =
            parse("lastname eq 'O''Shea' and (contains(fullname,'mar') or not statecode eq 0)")
                .unwrap();
        assert!(matches(
            &expr,
            &row(json!({"lastname": "o'shea", "fullname": "Maren", "statecode": 0}))
        ));
        assert!(!matches(
            &expr,
            &row(json!({"lastname": "O'Shea", "fullname": "Bob", "statecode": 0}))
        ));
        assert!(parse("name eq 'unterminated").is_err());
        assert!(parse("name wibble 'x'").is_err());
    }
}
